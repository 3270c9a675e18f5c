# COMMAND: python -m jaxsft.run --config configs/sft_moe.py --workdir runs/sft_moe --config.model.name_or_path=allenai/OLMoE-1B-7B-0924-Instruct --config.data.train=../shared/data/instruct/alpaca_en_demo.json
"""Instruction SFT of a mixture-of-experts checkpoint (Mixtral `mixtral`, Qwen3-MoE `qwen3_moe`, OLMoE `olmoe`; task
causal_lm): as configs/sft.py (Alpaca / prompt-completion / chat `messages` / `text` data, packed rows, loss on the
responses only, 5% of data.train held out unless data.eval is given). OLMoE-1B-7B holds 7B parameters of which 1B
are active per token (64 experts, 8 per token): split the experts over devices with --config.mesh.expert=N (each
device keeps 64 / N experts of every layer) and the rest with mesh.fsdp, e.g. on 8 GPUs
--config.mesh.data=1 --config.mesh.fsdp=2 --config.mesh.expert=4. The router's load-balancing loss is added when the
checkpoint's config.json sets output_router_logits (then with model.remat=none); Qwen/Qwen3-30B-A3B works the same
way. LoRA instead of full fine-tuning: add --config.lora.rank=16 (attention projections; the experts stay frozen)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_gemma import get_config as gemma_sft  # noqa: E402


def get_config():
    c = gemma_sft()  # the same bf16 / remat / packing settings, with MoE's learning rate and accumulation
    c.model.name_or_path = "allenai/OLMoE-1B-7B-0924-Instruct"
    c.gradient_accumulation_steps = 2
    c.learning_rate = 1e-5
    return c
