"""GPT-2: NNX modules with transformers' names (Conv1D weights stored (in, out)), causal LM and classification heads.

Attention scaling follows `scale_attn_weights` and `scale_attn_by_inverse_layer_idx`; `reorder_and_upcast_attn`
needs nothing (softmax is always computed in float32 here). Cross-attention is not supported.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.models.layers import (
    HEAD_RULES,
    CausalLM,
    Conv1D,
    LastTokenClassifier,
    LayerNorm,
    activation,
    attention,
    decoder_context,
    dropout,
    embed,
    neftune,
    split_batch,
    sub_rng,
    write_kv,
)

MODEL_TYPES = ("gpt2",)


def check_config(cfg) -> None:
    if getattr(cfg, "add_cross_attention", False):
        raise ValueError("GPT-2 with add_cross_attention=True is not supported")


class GPT2Attention(nnx.Module):
    def __init__(self, cfg, layer_idx: int, dtype, rngs: nnx.Rngs):
        d, std = cfg.hidden_size, cfg.initializer_range
        self.num_heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.c_attn = Conv1D(d, 3 * d, dtype=dtype, rngs=rngs, std=std)
        self.c_proj = Conv1D(d, d, dtype=dtype, rngs=rngs, std=std)
        scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.scale = scale / (layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else scale
        self.attn_rate, self.resid_rate = cfg.attn_pdrop, cfg.resid_pdrop

    def __call__(self, x, mask, rng, cache=None, layer=0, cache_index=None):
        b, t, d = x.shape
        q, k, v = (y.reshape(b, t, self.num_heads, self.head_dim) for y in jnp.split(self.c_attn(x), 3, axis=-1))
        kv = None
        if cache is not None:
            k, v = kv = write_kv(cache, layer, k, v, cache_index)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        out = attention(q, k, v, mask, dropout_rate=self.attn_rate, rng=sub_rng(rng, 0), scale=self.scale,
                        implementation="xla" if cache is not None else None)
        return dropout(self.c_proj(out.reshape(b, t, d)), self.resid_rate, sub_rng(rng, 1)), kv


class GPT2MLP(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, std = cfg.hidden_size, cfg.initializer_range
        inner = cfg.n_inner if cfg.n_inner is not None else 4 * d
        self.c_fc = Conv1D(d, inner, dtype=dtype, rngs=rngs, std=std)
        self.c_proj = Conv1D(inner, d, dtype=dtype, rngs=rngs, std=std)
        self.act = activation(cfg.activation_function)
        self.rate = cfg.resid_pdrop

    def __call__(self, x, rng):
        return dropout(self.c_proj(self.act(self.c_fc(x))), self.rate, rng)


class GPT2Block(nnx.Module):
    def __init__(self, cfg, layer_idx: int, dtype, rngs: nnx.Rngs):
        eps = cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm(cfg.hidden_size, eps=eps, rngs=rngs)
        self.attn = GPT2Attention(cfg, layer_idx, dtype, rngs)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps=eps, rngs=rngs)
        self.mlp = GPT2MLP(cfg, dtype, rngs)

    def __call__(self, x, mask, rng, cache=None, layer=0, cache_index=None):
        h, kv = self.attn(self.ln_1(x), mask, sub_rng(rng, 0), cache, layer, cache_index)
        x = x + h
        return x + self.mlp(self.ln_2(x), sub_rng(rng, 1)), kv


class GPT2Model(nnx.Module):
    """wte + wpe → dropout → blocks → ln_f."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, neftune_noise_alpha: float = 0.0):
        check_config(cfg)
        self.neftune_noise_alpha = float(neftune_noise_alpha or 0.0)
        d, std = cfg.hidden_size, cfg.initializer_range
        self.wte = embed(cfg.vocab_size, d, dtype=dtype, rngs=rngs, std=std)
        self.wpe = embed(cfg.max_position_embeddings, d, dtype=dtype, rngs=rngs, std=std)
        self.h = nnx.List([GPT2Block(cfg, i, dtype, rngs) for i in range(cfg.num_hidden_layers)])
        self.ln_f = LayerNorm(d, eps=cfg.layer_norm_epsilon, rngs=rngs)
        self.rate = cfg.embd_pdrop

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, rng=None, cache=None,
                 cache_index=None):
        """Final hidden states (batch, T, hidden) and the updated cache (None without one)."""
        positions, mask_for = decoder_context(input_ids, attention_mask, positions, segment_ids, cache_index,
                                              cache is not None)
        mask = mask_for()
        tokens = neftune(self.wte(input_ids), self.neftune_noise_alpha, rng)  # HF: the hook on wte's output
        x = split_batch(dropout(tokens + self.wpe(positions), self.rate, sub_rng(rng, 1000)))
        new_cache = {}
        for i, block in enumerate(self.h):
            x, kv = block(x, mask, sub_rng(rng, i), cache, i, cache_index)
            x = split_batch(x)
            if kv is not None:
                new_cache[f"layers.{i}.k"], new_cache[f"layers.{i}.v"] = kv
        return self.ln_f(x), (new_cache if cache is not None else None)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with its LM head: tied to wte unless the config says tie_word_embeddings=False."""

    base_prefix, embedding_name = "transformer", "wte"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        super().__init__(GPT2Model(cfg, dtype, rngs, **options), cfg, dtype, rngs, kv_heads=cfg.num_attention_heads,
                         head_dim=cfg.hidden_size // cfg.num_attention_heads,
                         tied=bool(getattr(cfg, "tie_word_embeddings", True)))


class GPT2ForSequenceClassification(LastTokenClassifier):
    base_prefix = "transformer"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        super().__init__(GPT2Model(cfg, dtype, rngs, **options), cfg, dtype, rngs)


# Model options this family takes from the config (models.build_model passes them on).
OPTIONS = ("neftune_noise_alpha",)


def causal_lm(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    return GPT2LMHeadModel(cfg, dtype, rngs=rngs, **options)


def sequence_classification(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    return GPT2ForSequenceClassification(cfg, dtype, rngs=rngs, **options)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return {"causal_lm": "GPT2LMHeadModel", "classification": "GPT2ForSequenceClassification"}[task]


def normalize_hf_key(key: str, base_prefix: str) -> str:
    """Original OpenAI-converted and base-model (GPT2Model) checkpoints lack the `transformer.` prefix."""
    if key.startswith(("wte.", "wpe.", "h.", "ln_f.")):
        return f"{base_prefix}.{key}"
    return key


# .attn.bias / .attn.masked_bias: causal-mask buffers of old checkpoints; lm_head.weight: tied to wte.
IGNORED_HF_KEYS = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


# Sharding (see parallel.py): regex over flat param names → PartitionSpec; kernels are (in, out). 'fsdp' takes one
# large dimension, 'tensor' the heads / hidden units; norms and unlisted biases are replicated.
# The fused q|k|v projection (c_attn) is not split over 'tensor': its out-features are [q | k | v], so a split
# would cut across q, k and v rather than between heads; attention shards over 'fsdp' only, the MLP over both.
PARTITION_RULES = (
    (r"\.wte\.embedding$", P("tensor", "fsdp")),
    (r"\.wpe\.embedding$", P(None, "fsdp")),
    (r"attn\.c_attn\.weight$", P("fsdp")),
    (r"attn\.c_proj\.weight$", P(None, "fsdp")),
    (r"mlp\.c_fc\.weight$", P("fsdp", "tensor")),
    (r"mlp\.c_fc\.bias$", P("tensor")),
    (r"mlp\.c_proj\.weight$", P("tensor", "fsdp")),
) + HEAD_RULES
