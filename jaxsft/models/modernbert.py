"""ModernBERT for sequence classification, as transformers' ModernBertForSequenceClassification: token embeddings →
LayerNorm, pre-norm layers (layer 0 without an attention norm) with a fused `Wqkv`, rotary positions and a GeGLU
MLP (`Wi` split in two: act(input) * gate), global layers every `global_attn_every_n_layers` and bidirectional
sliding-window layers between them (a key within local_attention // 2 slots either side), `final_norm`, then a
head dense → act → norm on [CLS] or on the mean of the real tokens (`classifier_pooling`), dropout, classifier.

transformers unpads the batch for speed; here padded rows are computed and padding is masked, with equal logits.
Positions are slot indices 0..T-1 (transformers' default position_ids), so left padding shifts them as there.
Module attribute names mirror transformers' PyTorch modules, so a parameter path joined with dots is its HF name
under the standard rule (`kernel`→`weight` transposed, `scale`/`embedding`→`weight`): import and export share it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.errors import UserError
from jaxsft.models.bert import _run_layer
from jaxsft.models.layers import (
    F32,
    HEAD_RULES,
    LayerNorm,
    activation,
    apply_rotary,
    attention,
    dense,
    dropout,
    embed,
    index_positions,
    padding_mask,
    remat_policy,
    rotary_inv_freq,
    rotary_tables,
    split_batch,
    sub_rng,
)

MODEL_TYPES = ("modernbert",)
GLOBAL, LOCAL = "full_attention", "sliding_attention"
DEFAULT_THETA = {GLOBAL: ("global_rope_theta", 160_000.0), LOCAL: ("local_rope_theta", 10_000.0)}


def layer_types(cfg) -> list[str]:
    """Per layer "full_attention" or "sliding_attention" (config.layer_types, else every n-th layer global)."""
    kinds = getattr(cfg, "layer_types", None)
    if kinds is None:
        n = getattr(cfg, "global_attn_every_n_layers", 3)
        kinds = [LOCAL if i % n else GLOBAL for i in range(cfg.num_hidden_layers)]
    unknown = sorted(set(kinds) - {GLOBAL, LOCAL})
    if unknown:
        raise UserError(f"modernbert: layer_types {unknown} in config.json are not {GLOBAL!r} / {LOCAL!r}")
    return list(kinds)


def inv_freq(cfg, kind: str) -> tuple[float, ...]:
    """The RoPE inverse frequencies of one layer kind: config.rope_parameters[kind] (transformers 5), else the
    transformers 4 fields global_rope_theta / local_rope_theta."""
    params = dict((getattr(cfg, "rope_parameters", None) or {}).get(kind) or {})
    field, default = DEFAULT_THETA[kind]
    params.setdefault("rope_theta", getattr(cfg, field, default))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return rotary_inv_freq(params, cfg.hidden_size // cfg.num_attention_heads)


def local_window_mask(attention_mask, half_window: int):
    """Boolean (batch, 1, T, T): query t sees real key s with |t - s| <= half_window (transformers'
    create_bidirectional_sliding_window_mask with sliding_window = local_attention // 2)."""
    t = attention_mask.shape[1]
    index = jnp.arange(t, dtype=jnp.int32)
    near = jnp.abs(index[:, None] - index[None, :]) <= half_window
    return padding_mask(attention_mask) & near[None, None]


class ModernBertEmbeddings(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.tok_embeddings = embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, use_bias=cfg.norm_bias, rngs=rngs)
        self.rate = cfg.embedding_dropout

    def __call__(self, input_ids, rng):
        return dropout(self.norm(self.tok_embeddings(input_ids)), self.rate, rng)


class ModernBertAttention(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, std = cfg.hidden_size, cfg.initializer_range
        self.num_heads = cfg.num_attention_heads
        self.Wqkv = dense(d, 3 * d, dtype=dtype, rngs=rngs, std=std, use_bias=cfg.attention_bias)
        self.Wo = dense(d, d, dtype=dtype, rngs=rngs, std=std, use_bias=cfg.attention_bias)
        self.rate = cfg.attention_dropout

    def __call__(self, x, mask, rope, rng):
        b, t, d = x.shape
        qkv = self.Wqkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        ctx = attention(q, k, v, mask, dropout_rate=self.rate, rng=sub_rng(rng, 0))
        # A query that sees no key (a pad slot farther than the window from every real token) gets zeros, as
        # transformers' default SDPA attention gives it (torch's safe softmax); its eager attention averages instead.
        ctx = jnp.where(jnp.swapaxes(mask.any(axis=-1), 1, 2)[..., None], ctx, 0)
        return dropout(self.Wo(ctx.reshape(b, t, d)), self.rate, sub_rng(rng, 1))


class ModernBertMLP(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.Wi = dense(cfg.hidden_size, 2 * cfg.intermediate_size, dtype=dtype, rngs=rngs, std=std,
                        use_bias=cfg.mlp_bias)
        self.Wo = dense(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=std, use_bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_activation)
        self.rate = cfg.mlp_dropout

    def __call__(self, x, rng):
        inputs, gate = jnp.split(self.Wi(x), 2, axis=-1)
        return self.Wo(dropout(self.act(inputs) * gate, self.rate, rng))


class ModernBertEncoderLayer(nnx.Module):
    def __init__(self, cfg, index: int, dtype, rngs: nnx.Rngs):
        norm = lambda: LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, use_bias=cfg.norm_bias, rngs=rngs)
        self.attn_norm = None if index == 0 else norm()  # transformers: nn.Identity in layer 0
        self.attn = ModernBertAttention(cfg, dtype, rngs)
        self.mlp_norm = norm()
        self.mlp = ModernBertMLP(cfg, dtype, rngs)

    def __call__(self, x, context, rng):
        """`context`: (mask, rope tables) of this layer's kind."""
        mask, rope = context
        h = x if self.attn_norm is None else self.attn_norm(x)
        x = x + self.attn(h, mask, rope, sub_rng(rng, 0))
        return x + self.mlp(self.mlp_norm(x), sub_rng(rng, 1))


class ModernBertModel(nnx.Module):
    """Embeddings, the layer stack and final_norm. `remat` as the BERT family; no `scan_layers`: layer 0 differs
    from the others (no attention norm) and the layers alternate global and sliding-window attention."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, remat: str = "none"):
        remat_policy(remat)  # checks the name
        self.embeddings = ModernBertEmbeddings(cfg, dtype, rngs)
        self.layers = nnx.List([ModernBertEncoderLayer(cfg, i, dtype, rngs) for i in range(cfg.num_hidden_layers)])
        self.final_norm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, use_bias=cfg.norm_bias, rngs=rngs)
        self.kinds = tuple(layer_types(cfg))
        self.inv_freqs = {kind: inv_freq(cfg, kind) for kind in sorted(set(self.kinds))}
        self.half_window = cfg.local_attention // 2
        self.remat = remat

    def __call__(self, input_ids, attention_mask, *, rng=None):
        positions = index_positions(input_ids)
        masks = {GLOBAL: padding_mask(attention_mask), LOCAL: local_window_mask(attention_mask, self.half_window)}
        contexts = {kind: (masks[kind], rotary_tables(positions, freqs)) for kind, freqs in self.inv_freqs.items()}
        x = split_batch(self.embeddings(input_ids, sub_rng(rng, 1000)))
        policy = remat_policy(self.remat)
        for i, (layer, kind) in enumerate(zip(self.layers, self.kinds)):
            if policy is not None:
                graphdef, state = nnx.split(layer)
                x = jax.checkpoint(_run_layer, policy=policy, static_argnums=(0,))(graphdef, state, x, contexts[kind],
                                                                                    sub_rng(rng, 1001, i))
            else:
                x = layer(x, contexts[kind], sub_rng(rng, 1001, i))
            x = split_batch(x)
        return self.final_norm(x)


class ModernBertPredictionHead(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=cfg.initializer_range,
                           use_bias=cfg.classifier_bias)
        self.act = activation(cfg.classifier_activation)
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, use_bias=cfg.norm_bias, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.act(self.dense(x)))


def mean_pool(hidden, attention_mask):
    """Mean of the hidden states of the real tokens (a row without any, batch filler, gives zeros, not NaN)."""
    keep = attention_mask.astype(F32)[..., None]
    total = (hidden.astype(F32) * keep).sum(axis=1)
    return (total / jnp.maximum(keep.sum(axis=1), 1.0)).astype(hidden.dtype)


class ModernBertForSequenceClassification(nnx.Module):
    """[CLS] or the mean of the real tokens → head (dense → act → norm) → dropout → classifier, as transformers'
    ModernBertForSequenceClassification. token_type_ids are accepted and ignored (ModernBERT has none)."""

    base_prefix = "model"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        if cfg.classifier_pooling not in ("cls", "mean"):
            raise UserError(f"modernbert: classifier_pooling {cfg.classifier_pooling!r} is not 'cls' or 'mean'")
        self.model = ModernBertModel(cfg, dtype, rngs, **options)
        self.head = ModernBertPredictionHead(cfg, dtype, rngs)
        self.classifier = dense(cfg.hidden_size, cfg.num_labels, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.pooling, self.rate = cfg.classifier_pooling, cfg.classifier_dropout

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        hidden = self.model(input_ids, attention_mask, rng=rng)
        pooled = hidden[:, 0] if self.pooling == "cls" else mean_pool(hidden, attention_mask)
        pooled = dropout(self.head(pooled), self.rate, sub_rng(rng, 2000))
        return self.classifier(pooled).astype(F32)


def sequence_classification(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    """options: remat (config.model.remat)."""
    return ModernBertForSequenceClassification(cfg, dtype, rngs=rngs, **options)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return "ModernBertForSequenceClassification"


def normalize_hf_key(key: str, base_prefix: str) -> str:
    """Maps checkpoint names onto ours: base-model (ModernBertModel) checkpoints lack the `model.` prefix."""
    if key.startswith(("embeddings.", "layers.", "final_norm.")):
        key = f"{base_prefix}.{key}"
    return key


# ModernBertForMaskedLM's decoder (answerdotai/ModernBERT-base carries it): not part of the classifier. Its `head`
# (dense → act → norm) has the classifier head's names and loads into it, as transformers does.
IGNORED_HF_KEYS = ("decoder.weight", "decoder.bias")
OPTIONS = ("remat",)


# Sharding (see parallel.py): kernels are (in, out). The fused Wqkv / Wi outputs are [q | k | v] and [input | gate]:
# a contiguous split over 'tensor' would cut across those parts, so those kernels and the out-projections shard
# over 'fsdp' only.
PARTITION_RULES = (
    (r"embeddings\.tok_embeddings\.embedding$", P("tensor", "fsdp")),
    (r"attn\.Wqkv\.kernel$", P("fsdp", None)),
    (r"mlp\.Wi\.kernel$", P("fsdp", None)),
    (r"(attn|mlp)\.Wo\.kernel$", P(None, "fsdp")),
    (r"^head\.dense\.kernel$", P("fsdp")),
) + HEAD_RULES
