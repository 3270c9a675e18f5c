# COMMAND: python -m jaxsft.run --config configs/sft_gemma.py --workdir runs/sft_gemma --config.model.name_or_path=google/gemma-2-2b-it --config.data.train=../shared/data/instruct/alpaca_en_demo.json
"""Instruction SFT of a Gemma checkpoint (Gemma 1 `gemma`, Gemma 2 `gemma2`, Gemma 3 text `gemma3_text`; task
causal_lm): as configs/sft.py (Alpaca / prompt-completion / chat `messages` / `text` data, packed rows, loss on the
responses only, 5% of data.train held out unless data.eval is given) with settings for Gemma's size: its 256k
vocabulary makes the (batch, T, vocab) float32 logits the largest activation, so the batch is split into micro-batches
(Gemma 2 soft-caps its final logits, which the chunked loss cannot take). Gemma repositories on the hub are gated
(accept the license, then `huggingface-cli login`); any local HF folder of a Gemma checkpoint works offline, e.g.
--config.model.name_or_path=google/gemma-2b-it. LoRA instead of full fine-tuning: add --config.lora.rank=16."""

from jaxsft.defaults import base_config


def get_config():
    c = base_config()
    c.task = "causal_lm"
    c.model.name_or_path = "google/gemma-2-2b-it"
    c.data.train = ""  # required: a file or HF dataset spec
    c.data.eval_fraction = 0.05
    c.data.packing = True
    c.max_length = 1024
    c.batch_size = 16
    c.gradient_accumulation_steps = 4
    c.num_epochs = 2
    c.learning_rate = 2e-5
    c.warmup_ratio = 0.03
    c.weight_decay = 0.0
    c.dtype = "bfloat16"
    c.model.remat = "dots"
    c.log_every_steps = 10
    c.keep_checkpoints = 1
    return c
