"""DeBERTa-v2 / v3 (HF model_type "deberta-v2") for sequence classification, as transformers'
DebertaV2ForSequenceClassification: embeddings (word, optional absolute positions and token types, an
`embedding_size` → `hidden_size` projection, LayerNorm, then zeroed at padding), post-LN layers whose
self-attention adds the disentangled relative-position terms (content→position "c2p" and position→content "p2c",
over log-bucketed relative distances, with one table `encoder.rel_embeddings` shared by all layers), the optional
convolution after the first layer (v2-xlarge's `conv_kernel_size`), and the head ContextPooler (dense →
pooler_hidden_act on the first token) → dropout → classifier.

The relative terms go to `layers.attention` as an additive bias on the scaled scores (per batch row and head: they
depend on the queries and keys), so the kernel is the platform's for a biased call. Relative positions depend only
on the (static) sequence length: they are numpy constants of the trace.

Module attribute names mirror transformers' PyTorch modules, so a parameter path joined with dots is its HF name
under the standard rule (`kernel`→`weight` transposed, `scale`/`embedding`→`weight`): import and export share it.
The layer stack is BERT's (bert.BertEncoder: `remat`, `scan_layers`).
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.errors import UserError
from jaxsft.models import bert
from jaxsft.models.bert import BertEncoder, BertIntermediate, BertResidualOutput
from jaxsft.models.layers import F32, LayerNorm, activation, attention, dense, dropout, embed, split_batch, sub_rng

MODEL_TYPES = ("deberta-v2",)
POSITION_TERMS = ("c2p", "p2c")


def log_bucket_positions(relative, bucket_size: int, max_position: int) -> np.ndarray:
    """transformers' make_log_bucket_position in float32: distances under bucket_size / 2 kept, longer ones
    log-spaced up to max_position."""
    sign = np.sign(relative)
    mid = bucket_size // 2
    abs_pos = np.where((relative < mid) & (relative > -mid), mid - 1, np.abs(relative)).astype(np.float32)
    scale = np.log(np.float32((max_position - 1) / mid))
    log_pos = np.ceil(np.log(abs_pos / np.float32(mid)) / scale * np.float32(mid - 1)) + np.float32(mid)
    return np.where(abs_pos <= mid, relative.astype(np.float32), log_pos * sign).astype(np.int64)


def relative_positions(length: int, bucket_size: int, max_position: int) -> np.ndarray:
    """(length, length) query minus key position, log-bucketed when both sizes are set (build_relative_position)."""
    index = np.arange(length, dtype=np.int64)
    relative = index[:, None] - index[None, :]
    if bucket_size > 0 and max_position > 0:
        relative = log_bucket_positions(relative, bucket_size, max_position)
    return relative


def relative_span(cfg) -> tuple[int, int, int]:
    """(max_relative_positions, position_buckets, att_span) as transformers resolves them."""
    max_relative = getattr(cfg, "max_relative_positions", -1)
    if max_relative < 1:
        max_relative = cfg.max_position_embeddings
    buckets = getattr(cfg, "position_buckets", -1)
    return max_relative, buckets, buckets if buckets > 0 else max_relative


class DebertaV2Embeddings(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        std, width = cfg.initializer_range, getattr(cfg, "embedding_size", cfg.hidden_size)
        self.word_embeddings = embed(cfg.vocab_size, width, dtype=dtype, rngs=rngs, std=std)
        self.position_embeddings = (embed(cfg.max_position_embeddings, width, dtype=dtype, rngs=rngs, std=std)
                                    if getattr(cfg, "position_biased_input", True) else None)
        self.token_type_embeddings = (embed(cfg.type_vocab_size, width, dtype=dtype, rngs=rngs, std=std)
                                      if cfg.type_vocab_size > 0 else None)
        self.embed_proj = (dense(width, cfg.hidden_size, dtype=dtype, rngs=rngs, std=std, use_bias=False)
                           if width != cfg.hidden_size else None)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs)
        self.rate = cfg.hidden_dropout_prob

    def __call__(self, input_ids, token_type_ids, attention_mask, rng):
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            table = self.position_embeddings.num_embeddings
            if input_ids.shape[1] > table:  # a gather past the table would clamp silently
                raise UserError(f"sequence length {input_ids.shape[1]} exceeds the model's {table} positions "
                                "(max_position_embeddings in config.json, position_biased_input=true)")
            x = x + self.position_embeddings(jnp.arange(input_ids.shape[1])[None, :])
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.LayerNorm(x) * attention_mask[:, :, None].astype(x.dtype)  # padding zeroed, as transformers
        return dropout(x, self.rate, rng)


class DisentangledSelfAttention(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, std = cfg.hidden_size, cfg.initializer_range
        self.num_heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "attention_head_size", d // cfg.num_attention_heads)
        inner = self.num_heads * self.head_dim
        self.query_proj = dense(d, inner, dtype=dtype, rngs=rngs, std=std)
        self.key_proj = dense(d, inner, dtype=dtype, rngs=rngs, std=std)
        self.value_proj = dense(d, inner, dtype=dtype, rngs=rngs, std=std)
        self.terms = tuple(t for t in POSITION_TERMS if t in (cfg.pos_att_type or ()))
        # 1/sqrt(head_dim * (1 + number of position terms)), whether or not relative attention is on (transformers)
        self.scale = 1.0 / math.sqrt(self.head_dim * (1 + len(self.terms)))
        self.relative_attention = bool(getattr(cfg, "relative_attention", False))
        self.max_relative, self.buckets, self.span = relative_span(cfg)
        self.share_att_key = bool(getattr(cfg, "share_att_key", False))
        separate = self.relative_attention and not self.share_att_key
        self.pos_key_proj = dense(d, inner, dtype=dtype, rngs=rngs, std=std) if separate and "c2p" in self.terms \
            else None
        self.pos_query_proj = dense(d, inner, dtype=dtype, rngs=rngs, std=std) if separate and "p2c" in self.terms \
            else None
        self.rate, self.pos_rate = cfg.attention_probs_dropout_prob, cfg.hidden_dropout_prob

    def relative_bias(self, q, k, rel_embeddings, rng):
        """The c2p + p2c scores (batch, heads, T, T), float32, already scaled."""
        t, heads = q.shape[1], lambda y: y.reshape(y.shape[0], self.num_heads, self.head_dim)
        rel = dropout(rel_embeddings, self.pos_rate, rng)[: 2 * self.span]
        relative = relative_positions(t, self.buckets, self.max_relative)
        score = 0.0
        if "c2p" in self.terms:  # query i · key-side position embedding of bucket(i - j)
            pos_key = heads((self.key_proj if self.share_att_key else self.pos_key_proj)(rel))
            c2p = jnp.einsum("bthd,rhd->bhtr", q, pos_key, preferred_element_type=F32)
            index = np.clip(relative + self.span, 0, 2 * self.span - 1)
            score = score + jnp.take_along_axis(c2p, jnp.broadcast_to(index, c2p.shape[:2] + index.shape), axis=-1)
        if "p2c" in self.terms:  # key j · query-side position embedding of -bucket(j - i)
            pos_query = heads((self.query_proj if self.share_att_key else self.pos_query_proj)(rel))
            p2c = jnp.einsum("bshd,rhd->bhsr", k, pos_query, preferred_element_type=F32)
            index = np.clip(-relative + self.span, 0, 2 * self.span - 1)
            p2c = jnp.take_along_axis(p2c, jnp.broadcast_to(index, p2c.shape[:2] + index.shape), axis=-1)
            score = score + jnp.swapaxes(p2c, -1, -2)
        return score * self.scale

    def __call__(self, x, mask, rel_embeddings, rng):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
        q, k, v = split(self.query_proj(x)), split(self.key_proj(x)), split(self.value_proj(x))
        bias = None
        if self.relative_attention and self.terms:
            bias = self.relative_bias(q, k, rel_embeddings, sub_rng(rng, 1))
        ctx = attention(q, k, v, mask, bias=bias, dropout_rate=self.rate, rng=sub_rng(rng, 0), scale=self.scale)
        return ctx.reshape(b, t, -1)


class DebertaV2Attention(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.self = DisentangledSelfAttention(cfg, dtype, rngs)
        self.output = BertResidualOutput(cfg.hidden_size, cfg, dtype, rngs)

    def __call__(self, x, mask, rel_embeddings, rng):
        return self.output(self.self(x, mask, rel_embeddings, sub_rng(rng, 0)), x, sub_rng(rng, 1))


class DebertaV2Layer(nnx.Module):
    """BERT's post-LN layer around disentangled attention; `context` = (key-padding mask, relative embeddings)."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.attention = DebertaV2Attention(cfg, dtype, rngs)
        self.intermediate = BertIntermediate(cfg, dtype, rngs)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg, dtype, rngs)

    def __call__(self, x, context, rng):
        mask, rel_embeddings = context
        h = self.attention(x, mask, rel_embeddings, sub_rng(rng, 0))
        return self.output(self.intermediate(h), h, sub_rng(rng, 1))


class ConvLayer(nnx.Module):
    """transformers' ConvLayer: conv1d over the embeddings (zeroed at padding) → act → + first layer's output →
    LayerNorm → zeroed at padding."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        size = cfg.conv_kernel_size
        if size % 2 == 0:
            raise UserError(f"conv_kernel_size={size} in config.json: only odd sizes keep the sequence length")
        d = cfg.hidden_size
        self.conv = nnx.Conv(d, d, kernel_size=(size,), padding=[((size - 1) // 2,) * 2],
                             feature_group_count=getattr(cfg, "conv_groups", 1), dtype=dtype, param_dtype=F32,
                             kernel_init=nnx.initializers.normal(cfg.initializer_range),
                             bias_init=nnx.initializers.zeros, rngs=rngs)
        self.LayerNorm = LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs)
        self.act = activation(getattr(cfg, "conv_act", "tanh"))
        self.rate = cfg.hidden_dropout_prob

    def __call__(self, embedded, residual, attention_mask, rng):
        keep = attention_mask[:, :, None].astype(bool)
        out = self.act(dropout(jnp.where(keep, self.conv(embedded), 0), self.rate, rng))
        return self.LayerNorm(residual + out.astype(residual.dtype)) * keep.astype(residual.dtype)


class DebertaV2Encoder(BertEncoder):
    """BERT's layer stack over DeBERTa layers, the relative-position table (LayerNorm-ed when norm_rel_ebd says
    so) given to every layer, and the convolution after layer 0 when conv_kernel_size is set."""

    layer_class = DebertaV2Layer

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, **options):
        super().__init__(cfg, dtype, rngs, **options)
        std, d = cfg.initializer_range, cfg.hidden_size
        self.rel_embeddings = (embed(2 * relative_span(cfg)[2], d, dtype=dtype, rngs=rngs, std=std)
                               if getattr(cfg, "relative_attention", False) else None)
        norms = [x.strip() for x in getattr(cfg, "norm_rel_ebd", "none").lower().split("|")]
        self.LayerNorm = LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs) if "layer_norm" in norms else None
        self.conv = ConvLayer(cfg, dtype, rngs) if getattr(cfg, "conv_kernel_size", 0) > 0 else None

    def relative_embeddings(self):
        if self.rel_embeddings is None:
            return None
        rel = self.rel_embeddings.embedding[...]
        return rel if self.LayerNorm is None else self.LayerNorm(rel)

    def __call__(self, x, attention_mask, rng):
        context = (attention_mask.astype(bool)[:, None, None, :], self.relative_embeddings())
        if self.conv is None:
            return super().__call__(x, context, rng)
        # layer 0, the convolution, then layers 1.. through BertEncoder's loop (a scanned stack sliced in two)
        if self.scan_layers:
            graphdef, state = nnx.split(self.layer)
            first = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
            rest = nnx.merge(graphdef, jax.tree.map(lambda a: a[1:], state))
        else:
            first, rest = self.layer[0], list(self.layer)[1:]
        h = self.conv(x, first(x, context, sub_rng(rng, 0)), attention_mask, sub_rng(rng, 1))
        tail = types.SimpleNamespace(remat=self.remat, scan_layers=self.scan_layers, layer=rest,
                                     num_layers=getattr(self, "num_layers", 1) - 1)
        return BertEncoder.__call__(tail, split_batch(h), context, sub_rng(rng, 2))


class DebertaV2Model(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs, **options):
        self.embeddings = DebertaV2Embeddings(cfg, dtype, rngs)
        self.encoder = DebertaV2Encoder(cfg, dtype, rngs, **options)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = split_batch(self.embeddings(input_ids, token_type_ids, attention_mask, sub_rng(rng, 1000)))
        return self.encoder(x, attention_mask, sub_rng(rng, 1001))


class ContextPooler(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d = getattr(cfg, "pooler_hidden_size", cfg.hidden_size)
        self.dense = dense(d, d, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.act = activation(cfg.pooler_hidden_act)
        self.rate = cfg.pooler_dropout

    def __call__(self, hidden, rng):
        return self.act(self.dense(dropout(hidden[:, 0], self.rate, rng)))


class DebertaV2ForSequenceClassification(nnx.Module):
    """First token → dropout → ContextPooler dense → pooler_hidden_act → dropout (cls_dropout, else
    hidden_dropout_prob) → classifier, as transformers' DebertaV2ForSequenceClassification."""

    base_prefix = "deberta"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        self.deberta = DebertaV2Model(cfg, dtype, rngs, **options)
        self.pooler = ContextPooler(cfg, dtype, rngs)
        self.classifier = dense(cfg.hidden_size, cfg.num_labels, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        rate = getattr(cfg, "cls_dropout", None)
        self.rate = cfg.hidden_dropout_prob if rate is None else rate

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        hidden = self.deberta(input_ids, attention_mask, token_type_ids, rng=rng)
        pooled = dropout(self.pooler(hidden, sub_rng(rng, 2000)), self.rate, sub_rng(rng, 2001))
        return self.classifier(pooled).astype(F32)


def sequence_classification(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    """options: remat, scan_layers (config.model.*), as the BERT family."""
    return DebertaV2ForSequenceClassification(cfg, dtype, rngs=rngs, **options)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return "DebertaV2ForSequenceClassification"


def normalize_hf_key(key: str, base_prefix: str) -> str:
    """Maps checkpoint names onto ours: base-model (DebertaV2Model) checkpoints lack the `deberta.` prefix; old
    ones say LayerNorm gamma/beta."""
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith(("embeddings.", "encoder.")):
        key = f"{base_prefix}.{key}"
    return key


# The hub's checkpoints carry pre-training heads (masked LM: `lm_predictions` or legacy `cls.predictions`;
# replaced-token detection: `mask_predictions`) and, for v3, an unused absolute position table (transformers
# ignores it too): not part of the classifier, so not reported as unused.
IGNORED_HF_KEYS = ("position_ids", "embeddings.position_embeddings.weight", "lm_predictions.lm_head.bias") + tuple(
    f"{head}.{leaf}" for head in ("lm_predictions.lm_head.dense", "lm_predictions.lm_head.LayerNorm",
                                  "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                                  "cls.predictions.decoder", "mask_predictions.dense", "mask_predictions.LayerNorm",
                                  "mask_predictions.classifier")
    for leaf in ("weight", "bias")) + ("cls.predictions.bias",)
OPTIONS = bert.OPTIONS


# Sharding (see parallel.py): the projections of DeBERTa's attention, its relative table, embedding projection and
# convolution, then BERT's rules (embeddings, attention output, feed-forward, pooler, heads).
PARTITION_RULES = (
    (r"attention\.self\.(query|key|value|pos_key|pos_query)_proj\.kernel$", P("fsdp", "tensor")),
    (r"attention\.self\.(query|key|value|pos_key|pos_query)_proj\.bias$", P("tensor")),
    (r"encoder\.rel_embeddings\.embedding$", P(None, "fsdp")),
    (r"embeddings\.embed_proj\.kernel$", P(None, "fsdp")),
    (r"encoder\.conv\.conv\.kernel$", P(None, None, "fsdp")),
) + bert.PARTITION_RULES
