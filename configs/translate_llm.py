# COMMAND: python -m jaxsft.run --config configs/translate_llm.py --workdir runs/translate_llm --config.data.train=../shared/data/multi30k/train.en,../shared/data/multi30k/train.de --config.data.eval=../shared/data/multi30k/val.en,../shared/data/multi30k/val.de
"""Translation as instruction SFT of a decoder LLM (task causal_lm, data.format "translation"): each source/target
pair becomes the prompt "Translate from {source_lang} to {target_lang}:\\n{source}\\n" with the target as the
completion (loss on the target only); evaluation generates greedily and reports eval_bleu / eval_chrf (sacrebleu)
besides eval_loss. Add --config.lora.rank=16 for LoRA."""

from jaxsft.defaults import base_config


def get_config():
    c = base_config()
    c.task = "causal_lm"
    c.model.name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
    c.data.format = "translation"
    c.data.source_lang = "English"
    c.data.target_lang = "German"
    c.data.packing = True
    c.max_length = 256
    c.batch_size = 16
    c.num_epochs = 1
    c.learning_rate = 2e-5
    c.warmup_ratio = 0.03
    c.dtype = "bfloat16"
    c.decode.max_new_tokens = 96
    c.log_every_steps = 20
    c.keep_checkpoints = 1
    return c
