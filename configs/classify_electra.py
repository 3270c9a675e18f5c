# COMMAND: python -m jaxsft.run --config configs/classify_electra.py --workdir runs/classify_electra
"""ELECTRA sentiment classification: google/electra-base-discriminator (needs the hub, or any local ELECTRA folder
via --config.model.name_or_path) fine-tuned on the small data set shipped in jaxsft/resources/sentiment, as
configs/classify.py. The discriminator's pre-training head is dropped; the classification head (dense → gelu →
out_proj on [CLS]) is new."""

from importlib import resources

from jaxsft.defaults import base_config


def get_config():
    c = base_config()
    data = resources.files("jaxsft") / "resources" / "sentiment"
    c.model.name_or_path = "google/electra-base-discriminator"
    c.data.train = str(data / "train.tsv")
    c.data.eval = str(data / "eval.tsv")
    c.data.text_fields = ["sentence"]  # labels: inferred from data.train (here negative / positive)
    c.max_length = 64
    c.model.scan_layers = True  # one layer body to compile
    c.batch_size = 16
    c.num_epochs = 3
    c.learning_rate = 5e-5
    c.warmup_ratio = 0.1
    c.weight_decay = 0.01
    c.log_every_steps = 10
    return c
