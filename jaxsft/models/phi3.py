"""Phi-3 decoder LLMs (HF `phi3`: Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini) as transformers computes them.

Built on decoder.py (GQA attention, KV cache, masks, scan_layers, remat, NEFTune, heads), with what Phi-3 changes:
- FUSED projections kept as transformers' parameters: `self_attn.qkv_proj` (rows q | k | v) and `mlp.gate_up_proj`
  (gate | up halves), no biases; parameter paths, export and LoRA / PEFT targets (qkv_proj, o_proj, gate_up_proj,
  down_proj) are the HF names;
- RoPE on the first int(head_dim * partial_rotary_factor) dims of each head (Phi-4-mini: 0.75), the rest passed;
- "longrope" scaling (Phi-3-*-128k, Phi-3.5, Phi-4-mini): inverse frequencies divided by `short_factor` or, when the
  largest position of the call + 1 exceeds original_max_position_embeddings, by `long_factor` (transformers'
  `longrope_frequency_update`: one choice for the whole batch, made from the positions given); cos and sin are
  multiplied by the attention factor (`attention_factor`, else sqrt(1 + ln(s) / ln(original)) with
  s = `factor` or max_position_embeddings / original_max_position_embeddings) at every length, as transformers does;
- `sliding_window` (when set) in every layer; `resid_pdrop` dropout on the attention and MLP outputs before each
  residual add. transformers' Phi3Model never applies `embd_pdrop` (no embedding dropout), so neither do we.

Known difference (longrope only): decoding whose sequence grows past original_max_position_embeddings (4096 in the
released models) mid-generation. transformers then drops its cache and re-encodes every token with the long factors
(Phi3ForCausalLM.prepare_inputs_for_generation); jaxsft's KV cache keeps what it computed with the short ones (every
layer's keys depend on the layers below, so re-rotating the cached keys would not be enough: it takes a re-encode in
decoding.py). Tokens up to the crossing, prompts already past it, and all training / evaluation forwards are exact.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.models.decoder import (  # noqa: F401 - IGNORED_HF_KEYS, normalize_hf_key: the family's HF name rules
    IGNORED_HF_KEYS,
    DecoderAttention,
    DecoderModel,
    head_dim,
    kv_heads,
    normalize_hf_key,
)
from jaxsft.models.layers import (
    F32,
    HEAD_RULES,
    CausalLM,
    LastTokenClassifier,
    RMSNorm,
    activation,
    dense,
    dropout,
    rope_parameters,
    rotary_inv_freq,
    rotary_tables,
    sub_rng,
)

MODEL_TYPES = ("phi3",)
ARCHITECTURES = {"causal_lm": "Phi3ForCausalLM", "classification": "Phi3ForSequenceClassification"}


def rotary_dim(cfg) -> int:
    """How many dims of each head RoPE rotates: int(head_dim * partial_rotary_factor)."""
    factor = rope_parameters(cfg).get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    return int(head_dim(cfg) * (1.0 if factor is None else factor))


def rope_settings(cfg) -> tuple:
    """(short inverse frequencies, long ones or None, original_max_position_embeddings, cos / sin factor) as
    transformers' Phi3RotaryEmbedding computes them (the default RoPE: short only, factor 1)."""
    params, dim = rope_parameters(cfg), rotary_dim(cfg)
    kind = params["rope_type"]
    if kind not in ("default", "longrope"):
        raise ValueError(f"phi3: unsupported rope type {kind!r}; supported: default, longrope")
    theta = params["rope_theta"]
    if kind == "default":
        return rotary_inv_freq({"rope_type": "default", "rope_theta": theta}, dim), None, None, 1.0
    original = (getattr(cfg, "original_max_position_embeddings", None)
                or params.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    factor = params.get("factor") or cfg.max_position_embeddings / original
    scale = params.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    base = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))

    def inv(ext):  # float32 throughout, as transformers' _compute_longrope_parameters
        if len(ext) != dim // 2:
            raise ValueError(f"phi3: longrope factors have {len(ext)} entries, the rotary dims need {dim // 2}")
        return tuple(float(f) for f in (np.float32(1.0) / (np.asarray(ext, np.float32) * base)).astype(np.float32))

    return inv(params["short_factor"]), inv(params["long_factor"]), int(original), float(scale)


class Phi3Attention(DecoderAttention):
    """The decoder's attention (GQA, RoPE, KV cache, dispatch) reading q, k, v from one fused `qkv_proj`."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, std, hd = cfg.hidden_size, cfg.initializer_range, head_dim(cfg)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, kv_heads(cfg), hd
        self.qkv_proj = dense(d, (self.num_heads + 2 * self.num_kv_heads) * hd, dtype=dtype, rngs=rngs, std=std,
                              use_bias=False)
        self.o_proj = dense(self.num_heads * hd, d, dtype=dtype, rngs=rngs, std=std, use_bias=False)
        self.q_norm = self.k_norm = None
        self.rate = getattr(cfg, "attention_dropout", 0.0)

    def project(self, x):
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[..., :nq].reshape(b, t, self.num_heads, self.head_dim)
        k = qkv[..., nq:nq + nk].reshape(b, t, self.num_kv_heads, self.head_dim)
        v = qkv[..., nq + nk:].reshape(b, t, self.num_kv_heads, self.head_dim)
        return q, k, v


class Phi3MLP(nnx.Module):
    """down(up * act(gate)), gate and up the two halves of one fused `gate_up_proj`."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.gate_up_proj = dense(d, 2 * f, dtype=dtype, rngs=rngs, std=std, use_bias=False)
        self.down_proj = dense(f, d, dtype=dtype, rngs=rngs, std=std, use_bias=False)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(up * self.act(gate))


class Phi3Layer(nnx.Module):
    """x + dropout(attn(norm(x))), then + dropout(mlp(norm(x))) (resid_pdrop), as Phi3DecoderLayer."""

    def __init__(self, cfg, window: int | None, dtype, rngs: nnx.Rngs):
        self.self_attn = Phi3Attention(cfg, dtype, rngs)
        self.mlp = Phi3MLP(cfg, dtype, rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.resid_pdrop = float(getattr(cfg, "resid_pdrop", 0.0) or 0.0)
        self.window = window

    def __call__(self, x, rope, mask, rng, cache=None, layer=0, cache_index=None):
        h, kv = self.self_attn(self.input_layernorm(x), rope, mask, sub_rng(rng, 0), cache, layer, cache_index)
        x = x + dropout(h, self.resid_pdrop, sub_rng(rng, 1))
        return x + dropout(self.mlp(self.post_attention_layernorm(x)), self.resid_pdrop, sub_rng(rng, 2)), kv


class Phi3Model(DecoderModel):
    """HF's Phi3Model: embed_tokens → Phi3Layers → norm, with Phi-3's RoPE (partial, longrope); the forward pass,
    remat, scanned layers and the KV cache are DecoderModel's."""

    layer_class = Phi3Layer

    def rotary_frequencies(self, cfg):
        return rope_settings(cfg)

    def rotary(self, positions):
        short, long, original, scale = self.inv_freq
        inv = short
        if long is not None:  # transformers: seq_len = max(position_ids) + 1 over the whole call picks one set
            inv = jnp.where(jnp.max(positions) + 1 > original, jnp.asarray(long, F32), jnp.asarray(short, F32))
        cos, sin = rotary_tables(positions, inv)
        return (cos, sin) if scale == 1.0 else (cos * scale, sin * scale)


class Phi3ForCausalLM(CausalLM):
    """HF's Phi3ForCausalLM (Phi-4-mini ties its head to the embeddings)."""

    base_prefix, embedding_name = "model", "embed_tokens"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        super().__init__(Phi3Model(cfg, dtype, rngs, **options), cfg, dtype, rngs,
                         kv_heads=kv_heads(cfg), head_dim=head_dim(cfg),
                         tied=bool(getattr(cfg, "tie_word_embeddings", False)))


class Phi3ForSequenceClassification(LastTokenClassifier):
    """HF's Phi3ForSequenceClassification: `score` at the last non-pad token."""

    base_prefix = "model"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        super().__init__(Phi3Model(cfg, dtype, rngs, **options), cfg, dtype, rngs)


# Model options this family takes from the config (models.build_model passes them on).
OPTIONS = ("remat", "scan_layers", "neftune_noise_alpha")


def causal_lm(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    return Phi3ForCausalLM(cfg, dtype, rngs=rngs, **options)


def sequence_classification(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    return Phi3ForSequenceClassification(cfg, dtype, rngs=rngs, **options)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return ARCHITECTURES[task]


# Sharding: as the decoder's table, on the fused kernels. Their outputs are split over 'tensor' across the q | k | v
# (gate | up) boundaries, which XLA reshards after the slice (correct; the cost is unmeasured): transformers' own
# tensor-parallel plan gathers these outputs too ("colwise_gather_output").
PARTITION_RULES = (
    (r"embed_tokens\.embedding$", P("tensor", "fsdp")),
    (r"self_attn\.qkv_proj\.kernel$", P("fsdp", "tensor")),
    (r"self_attn\.o_proj\.kernel$", P("tensor", "fsdp")),
    (r"mlp\.gate_up_proj\.kernel$", P("fsdp", "tensor")),
    (r"mlp\.down_proj\.kernel$", P("tensor", "fsdp")),
) + HEAD_RULES
