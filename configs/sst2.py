# COMMAND: python -m jaxsft.run --config configs/sst2.py --workdir runs/sst2 --config.data.train=../shared/data/sst2/train.tsv --config.data.eval=../shared/data/sst2/dev.tsv
"""GLUE SST-2 binary sentiment from local TSV files (header `sentence<TAB>label`, labels 0/1), MiniLM by default;
set --config.model.name_or_path to use another BERT/RoBERTa checkpoint."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from classify import _minilm  # noqa: E402

from jaxsft.defaults import base_config  # noqa: E402


def get_config():
    c = base_config()
    c.model.name_or_path = _minilm()
    c.data.train = ""  # required: --config.data.train=.../sst2/train.tsv
    c.data.eval = ""
    c.data.text_fields = ["sentence"]
    c.data.label_names = ["negative", "positive"]
    c.max_length = 128
    c.batch_size = 32
    c.num_epochs = 1
    c.learning_rate = 5e-5
    c.warmup_ratio = 0.1
    c.weight_decay = 0.01
    c.log_every_steps = 50
    return c
