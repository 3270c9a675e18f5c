"""T5 (v1.0 ReLU, v1.1 / flan-T5 gated-GELU), mT5 and umT5: NNX encoder-decoder with transformers' module names.

Parameter paths are the HF names under the standard rule (see bert.py): `shared`, `encoder.block.<i>.layer.<j>...`,
`decoder...`, `lm_head`. The encoder/decoder `embed_tokens` HF keeps are aliases of `shared` (ignored on load,
re-tied by transformers on load of an export). T5 attention has no 1/sqrt(d) scaling and adds a relative position
bias from bucketed key-minus-query distances: the first layer's table serves every layer (umT5: one per layer).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.models.layers import (
    F32,
    HEAD_RULES,
    RMSNorm,
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

MODEL_TYPES = ("t5", "mt5", "umt5")
ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
                 "umt5": "UMT5ForConditionalGeneration"}


def head_settings(cfg) -> tuple[bool, bool]:
    """(lm_head tied to `shared`, decoder output rescaled by d_model**-0.5) as transformers decides them.

    transformers 5 forces `tie_word_embeddings=True` on T5 configs and keeps the checkpoint's own choice as
    `scale_decoder_outputs`: original T5 ties and rescales, v1.1 / flan-T5 / umT5 checkpoints have their own
    lm_head and no rescale. mT5 checkpoints have their own lm_head and transformers 5 never rescales mT5.
    """
    if cfg.model_type == "mt5":
        return False, False
    tied = bool(getattr(cfg, "scale_decoder_outputs", getattr(cfg, "tie_word_embeddings", True)))
    return tied, tied


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """transformers' T5Attention._relative_position_bucket (same float32 maths, so the same buckets)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    ratio = jnp.log(jnp.maximum(relative_position, 1).astype(F32) / max_exact) / math.log(max_distance / max_exact)
    large = jnp.minimum(max_exact + (ratio * (num_buckets - max_exact)).astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(relative_position < max_exact, relative_position, large)


class T5Attention(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, relative_bias: bool = False, bidirectional: bool = True):
        d, h, hd, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.initializer_factor
        self.num_heads, self.head_dim = h, hd
        # HF's (Mesh TensorFlow) init; no 1/sqrt(d) scaling of scores, so q gets the smaller std.
        self.q = dense(d, h * hd, dtype=dtype, rngs=rngs, std=f * (d * hd) ** -0.5, use_bias=False)
        self.k = dense(d, h * hd, dtype=dtype, rngs=rngs, std=f * d**-0.5, use_bias=False)
        self.v = dense(d, h * hd, dtype=dtype, rngs=rngs, std=f * d**-0.5, use_bias=False)
        self.o = dense(h * hd, d, dtype=dtype, rngs=rngs, std=f * (h * hd) ** -0.5, use_bias=False)
        self.relative_attention_bias = (embed(cfg.relative_attention_num_buckets, h, dtype=dtype, rngs=rngs,
                                              std=f * d**-0.5) if relative_bias else None)
        self.buckets = dict(bidirectional=bidirectional, num_buckets=cfg.relative_attention_num_buckets,
                            max_distance=cfg.relative_attention_max_distance)
        self.rate = cfg.dropout_rate

    def position_bias(self, query_positions, key_positions):
        """float32 (1, heads, T, S) for query/key positions (T,) and (S,)."""
        buckets = relative_position_bucket(key_positions[None, :] - query_positions[:, None], **self.buckets)
        return jnp.take(self.relative_attention_bias.embedding[...], buckets, axis=0).transpose(2, 0, 1)[None]

    def kv(self, x):
        b, s, _ = x.shape
        return (self.k(x).reshape(b, s, self.num_heads, self.head_dim),
                self.v(x).reshape(b, s, self.num_heads, self.head_dim))

    def __call__(self, x, k, v, mask, bias, rng, cached: bool):
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
        out = attention(q, k, v, mask, bias=bias, scale=1.0, dropout_rate=self.rate, rng=rng,
                        implementation="xla" if cached else None)
        return self.o(out.reshape(b, t, -1))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, relative_bias: bool, bidirectional: bool):
        self.SelfAttention = T5Attention(cfg, dtype, rngs, relative_bias=relative_bias, bidirectional=bidirectional)
        self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.rate = cfg.dropout_rate

    def __call__(self, x, mask, bias, rng, cache, layer, cache_index, new_cache):
        h = self.layer_norm(x)
        k, v = self_attention_kv(*self.SelfAttention.kv(h), cache, layer, cache_index, new_cache)
        h = self.SelfAttention(h, k, v, mask, bias, sub_rng(rng, 0), cache is not None)
        return x + dropout(h, self.rate, sub_rng(rng, 1))


class T5LayerCrossAttention(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.EncDecAttention = T5Attention(cfg, dtype, rngs)
        self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.rate = cfg.dropout_rate

    def __call__(self, x, k, v, mask, rng, cached: bool):
        h = self.EncDecAttention(self.layer_norm(x), k, v, mask, None, sub_rng(rng, 0), cached)
        return x + dropout(h, self.rate, sub_rng(rng, 1))


class T5DenseActDense(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.initializer_factor
        self.wi = dense(d, cfg.d_ff, dtype=dtype, rngs=rngs, std=f * d**-0.5, use_bias=False)
        self.wo = dense(cfg.d_ff, d, dtype=dtype, rngs=rngs, std=f * cfg.d_ff**-0.5, use_bias=False)
        self.act, self.rate = activation(cfg.dense_act_fn), cfg.dropout_rate

    def __call__(self, x, rng):
        return self.wo(dropout(self.act(self.wi(x)), self.rate, rng))


class T5DenseGatedActDense(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.initializer_factor
        self.wi_0 = dense(d, cfg.d_ff, dtype=dtype, rngs=rngs, std=f * d**-0.5, use_bias=False)
        self.wi_1 = dense(d, cfg.d_ff, dtype=dtype, rngs=rngs, std=f * d**-0.5, use_bias=False)
        self.wo = dense(cfg.d_ff, d, dtype=dtype, rngs=rngs, std=f * cfg.d_ff**-0.5, use_bias=False)
        self.act, self.rate = activation(cfg.dense_act_fn), cfg.dropout_rate

    def __call__(self, x, rng):
        return self.wo(dropout(self.act(self.wi_0(x)) * self.wi_1(x), self.rate, rng))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        gated = cfg.is_gated_act
        self.DenseReluDense = (T5DenseGatedActDense if gated else T5DenseActDense)(cfg, dtype, rngs)
        self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.rate = cfg.dropout_rate

    def __call__(self, x, rng):
        h = self.DenseReluDense(self.layer_norm(x), sub_rng(rng, 0))
        return x + dropout(h, self.rate, sub_rng(rng, 1))


class T5Block(nnx.Module):
    """layer.0 self-attention, (decoder) layer.1 cross-attention, then the feed-forward layer; pre-norm residuals."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, is_decoder: bool, relative_bias: bool):
        parts = [T5LayerSelfAttention(cfg, dtype, rngs, relative_bias=relative_bias, bidirectional=not is_decoder)]
        if is_decoder:
            parts.append(T5LayerCrossAttention(cfg, dtype, rngs))
        self.layer = nnx.List(parts + [T5LayerFF(cfg, dtype, rngs)])

    def __call__(self, x, mask, bias, rng, cross, cross_mask, cache, index, cache_index, new_cache):
        x = self.layer[0](x, mask, bias, sub_rng(rng, 0), cache, index, cache_index, new_cache)
        if cross is not None:
            x = self.layer[1](x, cross[f"layers.{index}.k"], cross[f"layers.{index}.v"], cross_mask, sub_rng(rng, 1),
                              cache is not None)
        return self.layer[-1](x, sub_rng(rng, 2))


class T5Stack(nnx.Module):
    """Blocks over already embedded tokens → final_layer_norm (HF's T5Stack without its embed_tokens alias)."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, is_decoder: bool):
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        every_layer = cfg.model_type == "umt5"
        self.block = nnx.List([T5Block(cfg, dtype, rngs, is_decoder=is_decoder, relative_bias=every_layer or i == 0)
                               for i in range(n)])
        self.final_layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.rate = cfg.dropout_rate

    def __call__(self, x, mask, query_positions, key_positions, rng, cross=None, cross_mask=None, cache=None,
                 cache_index=None):
        """(hidden (batch, T, d_model), updated self-attention cache ({} without one))."""
        x, bias, new_cache = split_batch(dropout(x, self.rate, sub_rng(rng, 1000))), None, {}
        for i, block in enumerate(self.block):
            attn = block.layer[0].SelfAttention
            if attn.relative_attention_bias is not None:
                bias = attn.position_bias(query_positions, key_positions)
            x = split_batch(block(x, mask, bias, sub_rng(rng, i), cross, cross_mask, cache, i, cache_index, new_cache))
        return dropout(self.final_layer_norm(x), self.rate, sub_rng(rng, 1001)), new_cache


class T5ForConditionalGeneration(Seq2SeqLM):
    """HF's T5ForConditionalGeneration (also MT5… and UMT5…): shared embeddings, encoder, decoder, LM head."""

    base_prefix = ""

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs):
        f = cfg.initializer_factor
        self.shared = embed(cfg.vocab_size, cfg.d_model, dtype=dtype, rngs=rngs, std=f)
        self.encoder = T5Stack(cfg, dtype, rngs, is_decoder=False)
        self.decoder = T5Stack(cfg, dtype, rngs, is_decoder=True)
        tied, self.rescale = head_settings(cfg)
        self.lm_head = None if tied else dense(cfg.d_model, cfg.vocab_size, dtype=dtype, rngs=rngs, std=f,
                                               use_bias=False)
        self.d_model, self.dtype = cfg.d_model, dtype
        self.cache_dims = (cfg.num_decoder_layers, cfg.num_heads, cfg.d_kv)

    def encode(self, input_ids, attention_mask, *, rng=None):
        """Encoder hidden states (batch, S, d_model) in the compute dtype."""
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        hidden, _ = self.encoder(self.shared(input_ids), padding_mask(attention_mask), positions, positions, rng)
        return hidden

    def cross_attentions(self) -> list:
        return [block.layer[1].EncDecAttention for block in self.decoder.block]

    def run_decoder(self, decoder_input_ids, cross, attention_mask, decoder_attention_mask, *, rng=None, cache=None,
                    cache_index=None):
        q_pos, k_pos, mask = seq2seq_decoder_slots(decoder_input_ids, decoder_attention_mask, cache, cache_index)
        return self.decoder(self.shared(decoder_input_ids), mask, q_pos, k_pos, rng, cross,
                            padding_mask(attention_mask), cache, cache_index)

    def logits(self, hidden):
        if self.rescale:
            hidden = hidden * (self.d_model**-0.5)
        out = self.shared.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return out.astype(F32)


def seq2seq_lm(cfg, dtype, rngs: nnx.Rngs) -> nnx.Module:
    return T5ForConditionalGeneration(cfg, dtype, rngs=rngs)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return ARCHITECTURES[cfg.model_type]


def normalize_hf_key(key: str, base_prefix: str) -> str:
    """T5 names already start at the root (shared / encoder / decoder / lm_head)."""
    return key


# embed_tokens and a tied lm_head are aliases of `shared`; a decoder-layer-0 cross-attention bias table that old
# checkpoints carry is unused (transformers ignores it too).
IGNORED_HF_KEYS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight",
                   "EncDecAttention.relative_attention_bias.weight")
# transformers ties a missing lm_head to `shared` on load (transformers-5 saves of untied configs omit it)
WEIGHT_FALLBACKS = {"lm_head.weight": "shared.weight"}


# Sharding (see parallel.py): regex over flat param names → PartitionSpec; kernels are (in, out). 'fsdp' takes one
# large dimension, 'tensor' the heads / hidden units; norms and unlisted biases are replicated.
PARTITION_RULES = (
    (r"(^shared|embed_tokens)\.embedding$", P("tensor", "fsdp")),
    (r"Attention\.(q|k|v)\.kernel$", P("fsdp", "tensor")),
    (r"Attention\.o\.kernel$", P("tensor", "fsdp")),
    (r"relative_attention_bias\.embedding$", P(None, "tensor")),  # (buckets, heads)
    (r"DenseReluDense\.wi(_0|_1)?\.kernel$", P("fsdp", "tensor")),
    (r"DenseReluDense\.wo\.kernel$", P("tensor", "fsdp")),
) + HEAD_RULES
