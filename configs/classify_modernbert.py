# COMMAND: python -m jaxsft.run --config configs/classify_modernbert.py --workdir runs/classify_modernbert
"""ModernBERT sentiment classification: answerdotai/ModernBERT-base (needs the hub, or any local ModernBERT folder
via --config.model.name_or_path) fine-tuned on the small data set of configs/classify.py. The masked-LM decoder is
dropped; the MLM's head (dense → gelu → norm) is kept, as transformers' ModernBertForSequenceClassification keeps
it, and the classifier is new. The layers are not scanned (layer 0 has no attention norm, and global and
sliding-window layers alternate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from classify import get_config as classify_config  # noqa: E402


def get_config():
    c = classify_config()
    c.model.name_or_path = "answerdotai/ModernBERT-base"
    c.model.scan_layers = False
    c.num_epochs = 3
    c.learning_rate = 5e-5
    return c
