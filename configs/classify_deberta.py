# COMMAND: python -m jaxsft.run --config configs/classify_deberta.py --workdir runs/classify_deberta
"""DeBERTa-v3 sentiment classification: microsoft/deberta-v3-base (needs the hub, and sentencepiece or protobuf for
its tokenizer; or any local DeBERTa-v2/v3 folder via --config.model.name_or_path, also one holding only
pytorch_model.bin, which jaxsft's hub download does not fetch) fine-tuned on the small data set shipped in
jaxsft/resources/sentiment, as configs/classify.py. The pre-training heads (masked LM, RTD) are dropped;
the head (ContextPooler: dense → gelu on [CLS], then the classifier) is new, as transformers'
DebertaV2ForSequenceClassification."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from classify import get_config as classify_config  # noqa: E402


def get_config():
    c = classify_config()
    c.model.name_or_path = "microsoft/deberta-v3-base"
    c.num_epochs = 3
    c.learning_rate = 2e-5  # a base-size rate (classify.py's 1e-4 suits the 6-layer MiniLM)
    return c
