# COMMAND: python -m jaxsft.run --config configs/sft.py --workdir runs/sft --config.model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct --config.data.train=../shared/data/instruct/alpaca_en_demo.json
"""Instruction SFT of a decoder LLM (task causal_lm): Alpaca / prompt-completion / chat `messages` / `text` data,
packed into max_length rows, loss on the responses only. Holds out 5% of data.train for evaluation unless
data.eval is given. Needs internet for a hub id; any local HF folder of a supported family works offline.
LoRA instead of full fine-tuning: add --config.lora.rank=16."""

from jaxsft.defaults import base_config


def get_config():
    c = base_config()
    c.task = "causal_lm"
    c.model.name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
    c.data.train = ""  # required: a file or HF dataset spec
    c.data.eval_fraction = 0.05
    c.data.packing = True
    c.max_length = 1024
    c.batch_size = 16
    c.num_epochs = 2
    c.learning_rate = 2e-5
    c.warmup_ratio = 0.03
    c.weight_decay = 0.0
    c.dtype = "bfloat16"
    c.log_every_steps = 10
    c.keep_checkpoints = 1
    return c
