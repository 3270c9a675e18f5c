# COMMAND: python -m jaxsft.run --config configs/classify_albert.py --workdir runs/classify_albert
"""ALBERT sentiment classification: albert/albert-base-v2 (needs the hub, or any local ALBERT folder via
--config.model.name_or_path) fine-tuned on the small data set of configs/classify.py. The pre-training heads
(masked LM, sentence order) are dropped; the pooler is the checkpoint's, the classifier is new. One shared layer
applied 12 times: model.scan_layers (kept from classify.py) compiles its body once."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from classify import get_config as classify_config  # noqa: E402


def get_config():
    c = classify_config()
    c.model.name_or_path = "albert/albert-base-v2"
    c.num_epochs = 3
    c.learning_rate = 3e-5
    return c
