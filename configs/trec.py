# COMMAND: python -m jaxsft.run --config configs/trec.py --workdir runs/trec --config.data.train=../shared/data/trec/train.tsv --config.data.eval=../shared/data/trec/test.tsv
"""TREC question classification, 6 coarse classes (ABBR DESC ENTY HUM LOC NUM), MiniLM by default."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from classify import _minilm  # noqa: E402

from jaxsft.defaults import base_config  # noqa: E402


def get_config():
    c = base_config()
    c.model.name_or_path = _minilm()
    c.data.train = ""  # required: --config.data.train=.../trec/train.tsv
    c.data.eval = ""
    c.data.text_fields = ["text"]
    c.data.label_field = "coarse"
    c.data.label_names = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    c.max_length = 64
    c.batch_size = 32
    c.num_epochs = 3
    c.learning_rate = 1e-4
    c.warmup_ratio = 0.1
    c.weight_decay = 0.01
    c.log_every_steps = 20
    return c
