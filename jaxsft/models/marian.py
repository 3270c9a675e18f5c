"""Marian (opus-mt): NNX post-LayerNorm encoder-decoder with transformers' module names (see bert.py for the rule).

Positions are sinusoidal (computed, never a parameter: HF's `embed_positions.weight` is ignored on load and not
written); `scale_embedding` multiplies token embeddings by sqrt(d_model). `final_logits_bias` is a buffer in HF,
saved in checkpoints: here a parameter that is loaded and exported but, as in HF, never trained (stop_gradient).
With `share_encoder_decoder_embeddings` the one table is `model.shared`; otherwise the encoder and decoder have their
own `embed_tokens`. A tied lm_head is the decoder's token table.

transformers' Marian is BART's code with a few choices fixed; `Layout` names them, so that bart.py (BART, mBART,
M2M100 / NLLB) builds its families from these classes: pre- or post-LayerNorm layers, a LayerNorm after the
embeddings, one at the end of each stack, the position embeddings and whether there is a final_logits_bias.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.models.layers import (
    F32,
    HEAD_RULES,
    LayerNorm,
    Seq2SeqLM,
    activation,
    attention,
    dense,
    dropout,
    embed,
    padding_mask,
    self_attention_kv,
    seq2seq_decoder_slots,
    split_batch,
    sub_rng,
)

MODEL_TYPES = ("marian",)


@functools.lru_cache(maxsize=8)
def sinusoidal_table(num_positions: int, dim: int) -> np.ndarray:
    """MarianSinusoidalPositionalEmbedding's weights (float64 maths, float32 result): sines in the first half of
    the features, cosines in the second."""
    angles = np.arange(num_positions)[:, None] / np.power(10000, 2 * (np.arange(dim) // 2) / dim)[None, :]
    out = np.empty((num_positions, dim), np.float32)
    half = dim // 2 + dim % 2
    out[:, :half], out[:, half:] = np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])
    return out


class SinusoidalPositions(nnx.Module):
    """MarianSinusoidalPositionalEmbedding: the fixed table read at each token's slot (never a parameter)."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.max_positions, self.d_model = cfg.max_position_embeddings, cfg.d_model

    def vectors(self, input_ids, slots, num_slots: int):
        """(T, d_model) or (batch, T, d_model) position vectors of the T tokens at `slots` (T,)."""
        return jnp.take(jnp.asarray(sinusoidal_table(self.max_positions, self.d_model)), slots, axis=0, mode="clip")


@dataclass(frozen=True)
class Layout:
    """Where a BART-derived family departs from Marian's choices (the defaults)."""

    normalize_before: bool = False  # pre-LayerNorm layers (mBART, M2M100); Marian, BART: post-LayerNorm
    layernorm_embedding: bool = False  # a LayerNorm on token + position embeddings (BART, mBART)
    final_layer_norm: bool = False  # `layer_norm` at the end of the encoder and of the decoder (mBART, M2M100)
    final_logits_bias: bool = True  # M2M100 has none
    positions: Callable = SinusoidalPositions  # (cfg, dtype, rngs) → a module with `vectors(ids, slots, num_slots)`


MARIAN = Layout()


class MarianAttention(nnx.Module):
    def __init__(self, cfg, heads: int, dtype, rngs: nnx.Rngs):
        d, std = cfg.d_model, cfg.init_std
        self.num_heads, self.head_dim = heads, d // heads
        self.k_proj = dense(d, d, dtype=dtype, rngs=rngs, std=std)
        self.v_proj = dense(d, d, dtype=dtype, rngs=rngs, std=std)
        self.q_proj = dense(d, d, dtype=dtype, rngs=rngs, std=std)
        self.out_proj = dense(d, d, dtype=dtype, rngs=rngs, std=std)
        self.rate = cfg.attention_dropout

    def kv(self, x):
        b, s, _ = x.shape
        return (self.k_proj(x).reshape(b, s, self.num_heads, self.head_dim),
                self.v_proj(x).reshape(b, s, self.num_heads, self.head_dim))

    def __call__(self, x, k, v, mask, rng, cached: bool):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        out = attention(q, k, v, mask, dropout_rate=self.rate, rng=rng, implementation="xla" if cached else None)
        return self.out_proj(out.reshape(b, t, -1))


class MarianLayer(nnx.Module):
    """What encoder and decoder layers share: self-attention, the feed-forward pair and their LayerNorms (after each
    residual sum; on each block's input with Layout.normalize_before)."""

    def _setup(self, cfg, heads: int, ffn_dim: int, dtype, rngs: nnx.Rngs, normalize_before: bool):
        d, std = cfg.d_model, cfg.init_std
        self.normalize_before = normalize_before
        self.self_attn = MarianAttention(cfg, heads, dtype, rngs)
        self.self_attn_layer_norm = LayerNorm(d, eps=1e-5, rngs=rngs)
        self.fc1 = dense(d, ffn_dim, dtype=dtype, rngs=rngs, std=std)
        self.fc2 = dense(ffn_dim, d, dtype=dtype, rngs=rngs, std=std)
        self.final_layer_norm = LayerNorm(d, eps=1e-5, rngs=rngs)
        self.activation_fn = activation(cfg.activation_function)
        self.rate, self.activation_dropout = cfg.dropout, cfg.activation_dropout

    def _residual(self, norm: LayerNorm, x, block, rng):
        """x + dropout(block(·)) with its LayerNorm: after the sum (post-norm) or on block's input (pre-norm)."""
        if self.normalize_before:
            return x + dropout(block(norm(x)), self.rate, rng)
        return norm(x + dropout(block(x), self.rate, rng))

    def _ffn(self, x, rng):
        """fc1 → activation → dropout → fc2, with its dropout, residual and final_layer_norm."""
        def block(h):
            return self.fc2(dropout(self.activation_fn(self.fc1(h)), self.activation_dropout, sub_rng(rng, 0)))

        return self._residual(self.final_layer_norm, x, block, sub_rng(rng, 1))


class MarianEncoderLayer(MarianLayer):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs, normalize_before: bool = False):
        self._setup(cfg, cfg.encoder_attention_heads, cfg.encoder_ffn_dim, dtype, rngs, normalize_before)

    def __call__(self, x, mask, rng):
        def attend(h):
            return self.self_attn(h, *self.self_attn.kv(h), mask, sub_rng(rng, 0), False)

        return self._ffn(self._residual(self.self_attn_layer_norm, x, attend, sub_rng(rng, 1)), sub_rng(rng, 2))


class MarianDecoderLayer(MarianLayer):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs, normalize_before: bool = False):
        self._setup(cfg, cfg.decoder_attention_heads, cfg.decoder_ffn_dim, dtype, rngs, normalize_before)
        self.encoder_attn = MarianAttention(cfg, cfg.decoder_attention_heads, dtype, rngs)
        self.encoder_attn_layer_norm = LayerNorm(cfg.d_model, eps=1e-5, rngs=rngs)

    def __call__(self, x, mask, cross_k, cross_v, cross_mask, rng, cache, layer, cache_index, new_cache):
        cached = cache is not None

        def attend_self(h):
            k, v = self_attention_kv(*self.self_attn.kv(h), cache, layer, cache_index, new_cache)
            return self.self_attn(h, k, v, mask, sub_rng(rng, 0), cached)

        def attend_source(h):
            return self.encoder_attn(h, cross_k, cross_v, cross_mask, sub_rng(rng, 2), cached)

        x = self._residual(self.self_attn_layer_norm, x, attend_self, sub_rng(rng, 1))
        x = self._residual(self.encoder_attn_layer_norm, x, attend_source, sub_rng(rng, 3))
        return self._ffn(x, sub_rng(rng, 4))


class MarianStack(nnx.Module):
    """Token embeddings × embed_scale + positions (→ layernorm_embedding) → dropout, the layers (each skipped with
    probability layerdrop while training, as HF's LayerDrop) (→ layer_norm): HF's encoder and decoder."""

    def _embed(self, tokens: nnx.Embed, input_ids, slots, num_slots: int, rng):
        x = tokens(input_ids) * self.embed_scale
        x = x + self.embed_positions.vectors(input_ids, slots, num_slots).astype(x.dtype)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return dropout(x, self.rate, rng)

    def _setup(self, cfg, vocab_size: int | None, dtype, rngs: nnx.Rngs, layout: Layout, layerdrop: float):
        d = cfg.d_model
        self.embed_tokens = None if vocab_size is None else embed(vocab_size, d, dtype=dtype, rngs=rngs,
                                                                    std=cfg.init_std)
        self.embed_positions = layout.positions(cfg, dtype, rngs)
        self.layernorm_embedding = LayerNorm(d, eps=1e-5, rngs=rngs) if layout.layernorm_embedding else None
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0
        self.d_model, self.rate, self.layerdrop = d, cfg.dropout, float(layerdrop or 0.0)

    def _finish(self, x):
        return x if self.layer_norm is None else self.layer_norm(x)

    def _maybe_skip(self, x, new, rng, i: int):
        """LayerDrop: while training (a key given), the layer's output is dropped (x kept) with p = layerdrop."""
        if rng is None or self.layerdrop <= 0.0:
            return new
        return jnp.where(jax.random.uniform(sub_rng(rng, 2000 + i)) < self.layerdrop, x, new)


class MarianEncoder(MarianStack):
    def __init__(self, cfg, vocab_size: int | None, dtype, rngs: nnx.Rngs, layout: Layout = MARIAN):
        self._setup(cfg, vocab_size, dtype, rngs, layout, getattr(cfg, "encoder_layerdrop", 0.0))
        self.layers = nnx.List([MarianEncoderLayer(cfg, dtype, rngs, layout.normalize_before)
                                for _ in range(cfg.encoder_layers)])
        self.layer_norm = LayerNorm(cfg.d_model, eps=1e-5, rngs=rngs) if layout.final_layer_norm else None

    def __call__(self, tokens: nnx.Embed, input_ids, attention_mask, rng):
        s = input_ids.shape[1]
        x = split_batch(self._embed(tokens, input_ids, jnp.arange(s), s, sub_rng(rng, 1000)))
        mask = padding_mask(attention_mask)
        for i, layer in enumerate(self.layers):
            x = split_batch(self._maybe_skip(x, layer(x, mask, sub_rng(rng, i)), rng, i))
        return self._finish(x)


class MarianDecoder(MarianStack):
    def __init__(self, cfg, vocab_size: int | None, dtype, rngs: nnx.Rngs, layout: Layout = MARIAN):
        self._setup(cfg, vocab_size, dtype, rngs, layout, getattr(cfg, "decoder_layerdrop", 0.0))
        self.layers = nnx.List([MarianDecoderLayer(cfg, dtype, rngs, layout.normalize_before)
                                for _ in range(cfg.decoder_layers)])
        self.layer_norm = LayerNorm(cfg.d_model, eps=1e-5, rngs=rngs) if layout.final_layer_norm else None

    def __call__(self, tokens: nnx.Embed, decoder_input_ids, cross, attention_mask, decoder_attention_mask, rng,
                 cache, cache_index):
        """(hidden (batch, T, d_model), updated self-attention cache ({} without one))."""
        slots, kv_slots, mask = seq2seq_decoder_slots(decoder_input_ids, decoder_attention_mask, cache, cache_index)
        x = split_batch(self._embed(tokens, decoder_input_ids, slots, kv_slots.shape[0], sub_rng(rng, 1000)))
        cross_mask, new_cache = padding_mask(attention_mask), {}
        for i, layer in enumerate(self.layers):
            new = layer(x, mask, cross[f"layers.{i}.k"], cross[f"layers.{i}.v"], cross_mask, sub_rng(rng, i), cache, i,
                        cache_index, new_cache)
            x = split_batch(self._maybe_skip(x, new, rng, i))
        return self._finish(x), new_cache


def shares_embeddings(cfg) -> bool:
    """One token table for encoder and decoder (always so outside Marian)."""
    return bool(getattr(cfg, "share_encoder_decoder_embeddings", True))


class MarianModel(nnx.Module):
    """`shared` (with share_encoder_decoder_embeddings), encoder, decoder. transformers 5 ties the stacks'
    `embed_tokens` to `shared` only under tie_word_embeddings; untied, each stack reads its own table (and
    `shared`, unused, is kept for the round trip)."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, layout: Layout = MARIAN):
        shared = shares_embeddings(cfg)
        own = not (shared and getattr(cfg, "tie_word_embeddings", True))
        self.shared = embed(cfg.vocab_size, cfg.d_model, dtype=dtype, rngs=rngs, std=cfg.init_std) if shared else None
        decoder_vocab = cfg.vocab_size if shared else cfg.decoder_vocab_size
        self.encoder = MarianEncoder(cfg, cfg.vocab_size if own else None, dtype, rngs, layout)
        self.decoder = MarianDecoder(cfg, decoder_vocab if own else None, dtype, rngs, layout)

    def tokens(self, stack: MarianStack) -> nnx.Embed:
        return stack.embed_tokens if stack.embed_tokens is not None else self.shared


class MarianMTModel(Seq2SeqLM):
    """HF's MarianMTModel: model (shared embeddings, encoder, decoder), lm_head (tied unless configured not to),
    final_logits_bias."""

    base_prefix = "model"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, layout: Layout = MARIAN):
        self.model = MarianModel(cfg, dtype, rngs, layout)
        vocab = cfg.vocab_size if shares_embeddings(cfg) else cfg.decoder_vocab_size
        self.final_logits_bias = nnx.Param(jnp.zeros((1, vocab), F32)) if layout.final_logits_bias else None
        tied = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = None if tied else dense(cfg.d_model, vocab, dtype=dtype, rngs=rngs, std=cfg.init_std,
                                               use_bias=False)
        heads = cfg.decoder_attention_heads
        self.dtype, self.cache_dims = dtype, (cfg.decoder_layers, heads, cfg.d_model // heads)

    def encode(self, input_ids, attention_mask, *, rng=None):
        """Encoder hidden states (batch, S, d_model) in the compute dtype."""
        return self.model.encoder(self.model.tokens(self.model.encoder), input_ids, attention_mask, rng)

    def cross_attentions(self) -> list:
        return [layer.encoder_attn for layer in self.model.decoder.layers]

    def run_decoder(self, decoder_input_ids, cross, attention_mask, decoder_attention_mask, *, rng=None, cache=None,
                    cache_index=None):
        decoder = self.model.decoder
        return decoder(self.model.tokens(decoder), decoder_input_ids, cross, attention_mask, decoder_attention_mask,
                       rng, cache, cache_index)

    def logits(self, hidden):
        head = self.model.tokens(self.model.decoder).attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        if self.final_logits_bias is None:
            return head.astype(F32)
        return head.astype(F32) + jax.lax.stop_gradient(self.final_logits_bias[...])


def seq2seq_lm(cfg, dtype, rngs: nnx.Rngs) -> nnx.Module:
    return MarianMTModel(cfg, dtype, rngs=rngs)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return "MarianMTModel"


def normalize_hf_key(key: str, base_prefix: str) -> str:
    """Base-model (MarianModel) checkpoints lack the `model.` prefix."""
    if key.startswith(("shared.", "encoder.", "decoder.")):
        return f"{base_prefix}.{key}"
    return key


# embed_positions: sinusoidal, recomputed; embed_tokens and a tied lm_head: aliases of the shared table.
IGNORED_HF_KEYS = ("embed_positions.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                   "lm_head.weight")


# Sharding (see parallel.py): regex over flat param names → PartitionSpec; kernels are (in, out). 'fsdp' takes one
# large dimension, 'tensor' the heads / hidden units; norms and unlisted biases are replicated.
PARTITION_RULES = (
    (r"(shared|embed_tokens)\.embedding$", P("tensor", "fsdp")),
    (r"(self_attn|encoder_attn)\.(q|k|v)_proj\.kernel$", P("fsdp", "tensor")),
    (r"(self_attn|encoder_attn)\.(q|k|v)_proj\.bias$", P("tensor")),
    (r"(self_attn|encoder_attn)\.out_proj\.kernel$", P("tensor", "fsdp")),
    (r"fc1\.kernel$", P("fsdp", "tensor")),
    (r"fc1\.bias$", P("tensor")),
    (r"fc2\.kernel$", P("tensor", "fsdp")),
) + HEAD_RULES
