"""Gemma decoder LLMs (Gemma 1 `gemma`, Gemma 2 `gemma2`, Gemma 3 text `gemma3_text`) as transformers computes them.

Built on decoder.py (attention, RoPE, KV cache, masks, scan_layers, remat, NEFTune are the Llama family's), with
what Gemma changes:
- the token embeddings are multiplied by sqrt(hidden_size), rounded to the compute dtype (transformers'
  `Gemma*TextScaledWordEmbedding`: `embed_scale.to(weight.dtype)`); the tied LM head reads the unscaled table;
- RMSNorm scales by (1 + weight) in float32 and casts after (weights stored as offsets from 1, zeros at init);
- a GeGLU MLP: `hidden_act` (Gemma 1; a legacy "gelu" means the tanh approximation, as GemmaConfig rewrites it) or
  `hidden_activation` (Gemma 2/3), gelu_pytorch_tanh in every released checkpoint;
- an explicit `head_dim` (256 in the released 2B/7B/9B models), the LM head tied to the embeddings.
Gemma 2 adds: attention scores scaled by `query_pre_attn_scalar`**-0.5 and soft-capped (tanh(s / c) * c before
the mask, `attn_logit_softcapping`), final logits soft-capped (`final_logit_softcapping`), a norm after attention
and around the MLP (pre/post feed-forward norms), sliding-window and global layers alternating (`layer_types`).
Gemma 3 (text) adds per-head q/k RMSNorms and a RoPE per layer kind (local base frequency on sliding layers);
transformers does not soft-cap its attention scores (Gemma3Attention passes no softcap), only its final logits.

NEFTune: transformers hooks `get_input_embeddings()`, which for Gemma (transformers 5) is the scaled embedding
module, so its noise is added AFTER the sqrt(hidden_size) scaling; ours sits where it does (tests/test_models_gemma).
Soft-capped attention has no fused kernel here (cuDNN through jax.nn.dot_product_attention and jaxsft's splash
wrapper take no soft-cap): it runs XLA's explicit attention, said once in the log on GPU / TPU.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.models import decoder
from jaxsft.models.decoder import (  # noqa: F401 - IGNORED_HF_KEYS, normalize_hf_key: the family's HF name rules
    IGNORED_HF_KEYS,
    DecoderAttention,
    DecoderMLP,
    DecoderModel,
    head_dim,
    kv_heads,
    normalize_hf_key,
)
from jaxsft.models.layers import (
    _WARNED,
    F32,
    CausalLM,
    Embed,
    LastTokenClassifier,
    PackedMask,
    RMSNorm,
    SegmentMask,
    activation,
    apply_rotary,
    attention,
    dense,
    dropout,
    platform,
    remat_policy,
    rope_parameters,
    rotary_inv_freq,
    write_kv,
)

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
ARCHITECTURE_NAMES = {"gemma": ("GemmaForCausalLM", "GemmaForSequenceClassification"),
                      "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
                      "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification")}

log = logging.getLogger("jaxsft")


def check_supported(cfg) -> None:
    if getattr(cfg, "use_bidirectional_attention", None):
        raise ValueError("use_bidirectional_attention=True (EmbeddingGemma-style encoders) is not supported; jaxsft "
                         "trains Gemma as a causal decoder")


def mlp_activation(cfg) -> str:
    """The GeGLU activation's name as transformers picks it for this Gemma."""
    if cfg.model_type == "gemma":  # GemmaConfig turns a legacy "gelu" into the tanh approximation
        name = getattr(cfg, "hidden_act", None) or "gelu_pytorch_tanh"
        return "gelu_pytorch_tanh" if name == "gelu" else name
    return getattr(cfg, "hidden_activation", None) or "gelu_pytorch_tanh"


def layer_kinds(cfg) -> list[tuple[int | None, int | None]]:
    """(sliding-window size or None, RoPE table: None (one for all layers) | 0 global | 1 local) per layer."""
    n = cfg.num_hidden_layers
    if cfg.model_type == "gemma":
        return [(None, None)] * n
    types = list(getattr(cfg, "layer_types", None) or [])[:n]
    if len(types) < n:
        raise ValueError(f"{cfg.model_type}: config.layer_types names {len(types)} layers, the model has {n}")
    window = getattr(cfg, "sliding_window", None)
    kinds = []
    for kind in types:
        sliding = kind == "sliding_attention"
        rope = (1 if sliding else 0) if cfg.model_type == "gemma3_text" else None
        kinds.append((window if sliding else None, rope))
    return kinds


def inv_freqs(cfg) -> tuple[float, ...]:
    """RoPE inverse frequencies; Gemma 3: the global layers' then the local (sliding) layers', concatenated (each
    attention layer takes its half of the tables, see GemmaAttention)."""
    hd = head_dim(cfg)
    if cfg.model_type != "gemma3_text":
        return rotary_inv_freq(rope_parameters(cfg), hd)
    params = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5: one per layer type
        full = dict(params.get("full_attention") or params["sliding_attention"])
        local = dict(params.get("sliding_attention") or full)
    else:  # a transformers 4 spelling: rope_theta (+ rope_scaling) global, rope_local_base_freq local
        full = rope_parameters(cfg)
        local = {"rope_type": "default", "rope_theta": getattr(cfg, "rope_local_base_freq", 10000.0)}
    for p in (full, local):
        p["rope_type"] = p.get("rope_type", p.get("type", "default"))
    return rotary_inv_freq(full, hd) + rotary_inv_freq(local, hd)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in float32, cast to the input dtype after the product.
    Param `scale` (HF `weight`), zeros at init."""

    def __init__(self, features: int, *, eps: float):
        self.scale = nnx.Param(jnp.zeros((features,), F32))
        self.eps = eps

    def __call__(self, x):
        y = x.astype(F32)
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...])).astype(x.dtype)


class ScaledEmbed(Embed):
    """An embedding whose lookups are multiplied by `normalizer` rounded to the compute dtype (float32 →
    compute dtype, as transformers' `embed_scale` buffer); `attend` (the tied LM head) uses the plain table."""

    def __init__(self, num: int, features: int, *, dtype, rngs: nnx.Rngs, std: float):
        super().__init__(num, features, dtype=dtype, param_dtype=F32, embedding_init=nnx.initializers.normal(std),
                         rngs=rngs)
        self.normalizer = float(np.float32(features ** 0.5))

    def __call__(self, inputs):
        x = super().__call__(inputs)
        return x * jnp.asarray(np.float32(self.normalizer), F32).astype(x.dtype)


def _say_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("attention: XLA's explicit attention (%s)", reason)


def softcapped_attention(q, k, v, mask, *, scale: float, softcap: float, dropout_rate: float = 0.0, rng=None):
    """Gemma 2's eager attention: scores = (q . k) * scale, soft-capped to tanh(scores / softcap) * softcap, then
    the mask, a float32 softmax and (training) dropout. q (batch, T, heads, hd), k/v (batch, S, kv_heads, hd)
    (grouped-query heads read kv head i // (heads / kv_heads), as repeat_kv); mask boolean (batch, 1, T, S) or a
    SegmentMask / PackedMask (their dense form)."""
    if isinstance(mask, (SegmentMask, PackedMask)):
        mask = mask.dense
    if platform() != "cpu":
        _say_once(f"attention logit soft-capping ({softcap}) has no fused kernel")
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(F32).reshape(b, h, t, -1) * scale
    scores = jnp.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(F32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, rng).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.reshape(b, kvh, h // kvh, t, -1), v)
    return out.reshape(b, t, h, d)


class GemmaAttention(DecoderAttention):
    """The decoder's attention (q/k/v/o_proj, biases by `attention_bias`, GQA, RoPE, KV cache) with Gemma's
    score scale, Gemma 2's soft-cap, Gemma 3's q/k norms and per-layer-kind RoPE table (`rope_half`)."""

    def __init__(self, cfg, rope_half: int | None, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype, rngs)
        kind = cfg.model_type
        self.scale = None if kind == "gemma" else float(cfg.query_pre_attn_scalar) ** -0.5
        self.softcap = getattr(cfg, "attn_logit_softcapping", None) if kind == "gemma2" else None
        if kind == "gemma3_text":
            self.q_norm = nnx.data(GemmaRMSNorm(self.head_dim, eps=cfg.rms_norm_eps))  # None (static) before
            self.k_norm = nnx.data(GemmaRMSNorm(self.head_dim, eps=cfg.rms_norm_eps))
        self.rope_half = rope_half

    def __call__(self, x, rope, mask, rng, cache=None, layer=0, cache_index=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_half is not None:  # Gemma 3: [global | local] tables, each head_dim / 2 wide
            n = self.head_dim // 2
            rope = tuple(r[..., self.rope_half * n:(self.rope_half + 1) * n] for r in rope)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        kv = None
        if cache is not None:
            k, v = kv = write_kv(cache, layer, k, v, cache_index)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        if self.softcap:
            scale = self.scale if self.scale is not None else self.head_dim ** -0.5
            out = softcapped_attention(q, k, v, mask, scale=scale, softcap=float(self.softcap),
                                       dropout_rate=self.rate, rng=rng)
        else:
            out = attention(q, k, v, mask, dropout_rate=self.rate, rng=rng, scale=self.scale,
                            implementation="xla" if cache is not None else None)
        return self.o_proj(out.reshape(b, t, -1)), kv


class GemmaMLP(DecoderMLP):
    """GeGLU: down(act(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.gate_proj = dense(d, f, dtype=dtype, rngs=rngs, std=std, use_bias=False)
        self.up_proj = dense(d, f, dtype=dtype, rngs=rngs, std=std, use_bias=False)
        self.down_proj = dense(f, d, dtype=dtype, rngs=rngs, std=std, use_bias=False)
        self.act = activation(mlp_activation(cfg))


class GemmaLayer(nnx.Module):
    """Gemma 1: x + attn(norm(x)), then + mlp(norm(x)). Gemma 2/3 ("sandwich"): x + norm(attn(norm(x))), then
    + norm(mlp(norm(x)))."""

    def __init__(self, cfg, window: int | None, rope_half: int | None, dtype, rngs: nnx.Rngs):
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = GemmaAttention(cfg, rope_half, dtype, rngs)
        self.mlp = GemmaMLP(cfg, dtype, rngs)
        self.input_layernorm = GemmaRMSNorm(d, eps=eps)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps=eps)
        sandwich = cfg.model_type != "gemma"
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps=eps) if sandwich else None
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps=eps) if sandwich else None
        self.window = window

    def __call__(self, x, rope, mask, rng, cache=None, layer=0, cache_index=None):
        h, kv = self.self_attn(self.input_layernorm(x), rope, mask, rng, cache, layer, cache_index)
        if self.pre_feedforward_layernorm is None:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x)), kv
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), kv


class GemmaModel(DecoderModel):
    """HF's GemmaModel / Gemma2Model / Gemma3TextModel: scaled embed_tokens → layers → norm. The forward pass,
    remat, scanned layers and the KV cache are DecoderModel's (see there)."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, remat: str = "none", scan_layers: bool = False,
                 neftune_noise_alpha: float = 0.0):
        check_supported(cfg)
        self.neftune_noise_alpha = float(neftune_noise_alpha or 0.0)
        self.embed_tokens = ScaledEmbed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs,
                                        std=cfg.initializer_range)
        kinds = layer_kinds(cfg)
        layers = [GemmaLayer(cfg, w, r, dtype, rngs) for w, r in kinds]
        self.remat, self.scan_layers = remat, bool(scan_layers)
        remat_policy(remat)  # checks the name
        if self.scan_layers:
            if len(set(kinds)) > 1:
                from jaxsft.errors import UserError

                raise UserError(f"model.scan_layers: {cfg.model_type} alternates sliding-window and global layers "
                                "(layer_types); scanned layers need one kind; set model.scan_layers=False")
            graphdef, states = nnx.split(layers[0])[0], [nnx.split(layer)[1] for layer in layers]
            self.layers = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
            self.num_layers, self.window = len(layers), kinds[0][0]
        else:
            self.layers = nnx.List(layers)
        self.norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.inv_freq = inv_freqs(cfg)


def softcap(x, cap):
    return x if not cap else jnp.tanh(x / cap) * cap


class GemmaForCausalLM(CausalLM):
    """HF's GemmaForCausalLM / Gemma2ForCausalLM / Gemma3ForCausalLM (logits soft-capped by
    `final_logit_softcapping` where the config sets it)."""

    base_prefix, embedding_name = "model", "embed_tokens"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        super().__init__(GemmaModel(cfg, dtype, rngs, **options), cfg, dtype, rngs,
                         kv_heads=kv_heads(cfg), head_dim=head_dim(cfg),
                         tied=bool(getattr(cfg, "tie_word_embeddings", True)))
        cap = getattr(cfg, "final_logit_softcapping", None) if cfg.model_type != "gemma" else None
        self.final_logit_softcapping = float(cap) if cap else None

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, rng=None, cache=None,
                 cache_index=None, hidden_only: bool = False):
        out = super().__call__(input_ids, attention_mask, positions=positions, segment_ids=segment_ids, rng=rng,
                               cache=cache, cache_index=cache_index, hidden_only=hidden_only)
        if hidden_only or self.final_logit_softcapping is None:
            return out
        if cache is None:
            return softcap(out, self.final_logit_softcapping)
        return softcap(out[0], self.final_logit_softcapping), out[1]

    def head_kernel(self):
        """None with a final soft-cap (the logits are not a plain linear map: no chunked loss)."""
        return None if self.final_logit_softcapping is not None else super().head_kernel()


class GemmaForSequenceClassification(LastTokenClassifier):
    """HF's GemmaForSequenceClassification & co. (no soft-cap: transformers applies it to LM logits only)."""

    base_prefix = "model"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        super().__init__(GemmaModel(cfg, dtype, rngs, **options), cfg, dtype, rngs)


# Model options this family takes from the config (models.build_model passes them on).
OPTIONS = ("remat", "scan_layers", "neftune_noise_alpha")


def causal_lm(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    return GemmaForCausalLM(cfg, dtype, rngs=rngs, **options)


def sequence_classification(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    return GemmaForSequenceClassification(cfg, dtype, rngs=rngs, **options)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return ARCHITECTURE_NAMES[cfg.model_type][{"causal_lm": 0, "classification": 1}[task]]


# Sharding: the decoder's table (embed_tokens, q/k/v/o_proj, gate/up/down_proj, heads); Gemma's extra norms (and
# Gemma 3's q/k norms) are replicated as every norm is.
PARTITION_RULES = decoder.PARTITION_RULES
