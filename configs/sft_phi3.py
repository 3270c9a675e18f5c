# COMMAND: python -m jaxsft.run --config configs/sft_phi3.py --workdir runs/sft_phi3 --config.model.name_or_path=microsoft/Phi-4-mini-instruct --config.data.train=../shared/data/instruct/alpaca_en_demo.json
"""Instruction SFT of a Phi-3 checkpoint (HF `phi3`: Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini; task causal_lm):
as configs/sft.py (Alpaca / prompt-completion / chat `messages` / `text` data, packed rows, loss on the responses
only, 5% of data.train held out unless data.eval is given) with settings for a 3.8B model. Phi-3 keeps transformers'
fused projections, so LoRA targets (and PEFT's adapter_config) name qkv_proj / o_proj / gate_up_proj / down_proj,
not q_proj & co.; add --config.lora.rank=16 for LoRA instead of full fine-tuning. Any local HF folder of a Phi-3
checkpoint works offline, e.g. --config.model.name_or_path=microsoft/Phi-3.5-mini-instruct."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_gemma import get_config as gemma_sft  # noqa: E402


def get_config():
    c = gemma_sft()  # the same bf16 / remat / packing settings for a model of a few billion parameters
    c.model.name_or_path = "microsoft/Phi-4-mini-instruct"
    c.lora.target_modules = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # used when lora.rank > 0
    return c
