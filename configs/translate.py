# COMMAND: python -m jaxsft.run --config configs/translate.py --workdir runs/translate --config.data.train=../shared/data/multi30k/train.en,../shared/data/multi30k/train.de --config.data.eval=../shared/data/multi30k/val.en,../shared/data/multi30k/val.de
"""Machine translation (task seq2seq): fine-tune Helsinki-NLP/opus-mt-en-de (Marian) on line-aligned parallel text
(source file first) or JSONL/CSV/TSV with `source`/`target` fields; evaluation decodes the eval set (beam search
settings from the checkpoint's generation_config.json, overridable under decode.) and reports eval_bleu / eval_chrf
(sacrebleu). For T5: --config.model.name_or_path=t5-small --config.data.source_prefix="translate English to German: "."""

from jaxsft.defaults import base_config


def get_config():
    c = base_config()
    c.task = "seq2seq"
    c.model.name_or_path = "Helsinki-NLP/opus-mt-en-de"
    c.data.train = ""  # required: train.en,train.de or a file with source/target fields
    c.data.eval = ""
    c.max_length = 128
    c.data.max_target_length = 128
    c.batch_size = 32
    c.num_epochs = 3
    c.learning_rate = 5e-5
    c.warmup_ratio = 0.05
    c.weight_decay = 0.01
    c.label_smoothing = 0.1
    c.decode.num_beams = 4
    c.decode.max_new_tokens = 128
    c.log_every_steps = 50
    c.keep_checkpoints = 1
    return c
