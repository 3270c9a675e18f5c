"""The BERT family (BERT, RoBERTa, XLM-RoBERTa): NNX encoder modules, classification heads, HF weight names.

Module attribute names mirror transformers' PyTorch modules, so a parameter path joined with dots is its HF name
under the standard rule (`kernel`→`weight` transposed, `scale`/`embedding`→`weight`): import and export share it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.models.layers import (
    HEAD_RULES,
    LayerNorm,
    activation,
    attention,
    dense,
    dropout,
    embed,
    remat_policy,
    split_batch,
    sub_rng,
)

ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")
MODEL_TYPES = ("bert",) + ROBERTA_LIKE


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.word_embeddings = embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=std)
        self.position_embeddings = embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs, std=std)
        self.token_type_embeddings = embed(max(cfg.type_vocab_size, 1), cfg.hidden_size, dtype=dtype, rngs=rngs,
                                           std=std)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs)
        self.rate = cfg.hidden_dropout_prob
        # RoBERTa numbers positions from padding_idx + 1 and gives pads position padding_idx.
        self.padding_idx = cfg.pad_token_id if cfg.model_type in ROBERTA_LIKE else None

    def __call__(self, input_ids, token_type_ids, rng):
        if self.padding_idx is None:
            positions = jnp.arange(input_ids.shape[1])[None, :]
        else:
            real = (input_ids != self.padding_idx).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=1) * real + self.padding_idx
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings(token_type_ids)
        return dropout(self.LayerNorm(x), self.rate, rng)


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, std = cfg.hidden_size, cfg.initializer_range
        self.num_heads = cfg.num_attention_heads
        self.query = dense(d, d, dtype=dtype, rngs=rngs, std=std)
        self.key = dense(d, d, dtype=dtype, rngs=rngs, std=std)
        self.value = dense(d, d, dtype=dtype, rngs=rngs, std=std)
        self.rate = cfg.attention_probs_dropout_prob

    def __call__(self, x, mask, rng):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        ctx = attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), mask,
                        dropout_rate=self.rate, rng=rng)
        return ctx.reshape(b, t, d)


class BertResidualOutput(nnx.Module):
    """dense → dropout → add residual → LayerNorm (HF's BertSelfOutput and BertOutput)."""

    def __init__(self, d_in, cfg, dtype, rngs: nnx.Rngs):
        self.dense = dense(d_in, cfg.hidden_size, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs)
        self.rate = cfg.hidden_dropout_prob

    def __call__(self, h, residual, rng):
        return self.LayerNorm(dropout(self.dense(h), self.rate, rng) + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.self = BertSelfAttention(cfg, dtype, rngs)
        self.output = BertResidualOutput(cfg.hidden_size, cfg, dtype, rngs)

    def __call__(self, x, mask, rng):
        return self.output(self.self(x, mask, sub_rng(rng, 0)), x, sub_rng(rng, 1))


class BertIntermediate(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.dense = dense(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.act(self.dense(x))


class BertLayer(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, dtype, rngs)
        self.intermediate = BertIntermediate(cfg, dtype, rngs)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg, dtype, rngs)

    def __call__(self, x, mask, rng):
        h = self.attention(x, mask, sub_rng(rng, 0))
        return self.output(self.intermediate(h), h, sub_rng(rng, 1))


def _run_layer(graphdef, state, x, mask, rng):
    """One layer from its (graphdef, state): a pure function of arrays, so jax.checkpoint and lax.scan can wrap it."""
    return nnx.merge(graphdef, state)(x, mask, rng)


class BertEncoder(nnx.Module):
    """The layer stack. `remat` and `scan_layers` as in the decoder family (decoder.DecoderModel): scanned layers
    are one module whose parameters carry a leading layer axis (`bert.encoder.layer.attention.self.query.kernel`,
    stacked after construction so the random init equals the unscanned one) run under `jax.lax.scan`, so the
    layer body is compiled once."""

    layer_class = BertLayer  # a family's own layer: same constructor, called as layer(x, mask, rng) (deberta.py)

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, remat: str = "none", scan_layers: bool = False):
        layers = [self.layer_class(cfg, dtype, rngs) for _ in range(cfg.num_hidden_layers)]
        self.remat, self.scan_layers = remat, bool(scan_layers)
        remat_policy(remat)  # checks the name
        if self.scan_layers:
            graphdef, states = nnx.split(layers[0])[0], [nnx.split(layer)[1] for layer in layers]
            self.layer = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
            self.num_layers = len(layers)
        else:
            self.layer = nnx.List(layers)

    def __call__(self, x, mask, rng):
        policy = remat_policy(self.remat)
        if self.scan_layers:
            graphdef, state = nnx.split(self.layer)

            def body(h, xs):
                st, i = xs
                return split_batch(_run_layer(graphdef, st, h, mask, sub_rng(rng, i))), None

            if policy is not None:
                body = jax.checkpoint(body, policy=policy, prevent_cse=False)
            return jax.lax.scan(body, x, (state, jnp.arange(self.num_layers, dtype=jnp.int32)))[0]
        for i, layer in enumerate(self.layer):
            if policy is not None:
                graphdef, state = nnx.split(layer)
                x = jax.checkpoint(_run_layer, policy=policy, static_argnums=(0,))(graphdef, state, x, mask,
                                                                                    sub_rng(rng, i))
            else:
                x = layer(x, mask, sub_rng(rng, i))
            x = split_batch(x)
        return x


class BertPooler(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=cfg.initializer_range)

    def __call__(self, hidden):
        return jnp.tanh(self.dense(hidden[:, 0]))


class BertModel(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs, add_pooling_layer: bool = True, **options):
        self.embeddings = BertEmbeddings(cfg, dtype, rngs)
        self.encoder = BertEncoder(cfg, dtype, rngs, **options)
        self.pooler = BertPooler(cfg, dtype, rngs) if add_pooling_layer else None

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = attention_mask.astype(bool)[:, None, None, :]
        x = split_batch(self.embeddings(input_ids, token_type_ids, sub_rng(rng, 1000)))
        return self.encoder(x, mask, sub_rng(rng, 1001))


def _classifier_dropout(cfg) -> float:
    rate = getattr(cfg, "classifier_dropout", None)
    return cfg.hidden_dropout_prob if rate is None else rate


class BertForSequenceClassification(nnx.Module):
    """Pooler ([CLS] → dense → tanh) → dropout → linear, as transformers' BertForSequenceClassification."""

    base_prefix = "bert"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        self.bert = BertModel(cfg, dtype, rngs, add_pooling_layer=True, **options)
        self.classifier = dense(cfg.hidden_size, cfg.num_labels, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.rate = _classifier_dropout(cfg)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids, rng=rng)
        pooled = dropout(self.bert.pooler(hidden), self.rate, sub_rng(rng, 2000))
        return self.classifier(pooled).astype(jnp.float32)


class RobertaClassificationHead(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=std)
        self.out_proj = dense(cfg.hidden_size, cfg.num_labels, dtype=dtype, rngs=rngs, std=std)
        self.rate = _classifier_dropout(cfg)

    def __call__(self, hidden, rng):
        x = dropout(hidden[:, 0], self.rate, sub_rng(rng, 0))
        x = dropout(jnp.tanh(self.dense(x)), self.rate, sub_rng(rng, 1))
        return self.out_proj(x)


class RobertaForSequenceClassification(nnx.Module):
    """<s> → dropout → dense → tanh → dropout → out_proj, as transformers' RobertaForSequenceClassification."""

    base_prefix = "roberta"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        self.roberta = BertModel(cfg, dtype, rngs, add_pooling_layer=False, **options)
        self.classifier = RobertaClassificationHead(cfg, dtype, rngs)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        hidden = self.roberta(input_ids, attention_mask, token_type_ids, rng=rng)
        return self.classifier(hidden, sub_rng(rng, 2000)).astype(jnp.float32)


def sequence_classification(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    """options: remat, scan_layers (config.model.*)."""
    cls = RobertaForSequenceClassification if cfg.model_type in ROBERTA_LIKE else BertForSequenceClassification
    return cls(cfg, dtype, rngs=rngs, **options)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    names = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert"}
    return f"{names[cfg.model_type]}ForSequenceClassification"


def normalize_hf_key(key: str, base_prefix: str) -> str:
    """Maps checkpoint names onto ours: base-model checkpoints lack the prefix; old ones say gamma/beta."""
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith(("embeddings.", "encoder.", "pooler.")):
        key = f"{base_prefix}.{key}"
    return key


IGNORED_HF_KEYS = ("position_ids",)
OPTIONS = ("remat", "scan_layers")


# Sharding (see parallel.py): regex over flat param names → PartitionSpec; kernels are (in, out). 'fsdp' takes one
# large dimension, 'tensor' the heads / hidden units; norms and unlisted biases are replicated.
PARTITION_RULES = (
    (r"embeddings\.word_embeddings\.embedding$", P("tensor", "fsdp")),
    (r"embeddings\.(position|token_type)_embeddings\.embedding$", P(None, "fsdp")),
    (r"attention\.self\.(query|key|value)\.kernel$", P("fsdp", "tensor")),
    (r"attention\.self\.(query|key|value)\.bias$", P("tensor")),
    (r"attention\.output\.dense\.kernel$", P("tensor", "fsdp")),
    (r"intermediate\.dense\.kernel$", P("fsdp", "tensor")),
    (r"intermediate\.dense\.bias$", P("tensor")),
    (r"layer\.(\d+\.)?output\.dense\.kernel$", P("tensor", "fsdp")),  # per layer, or the scanned stack
    (r"pooler\.dense\.kernel$", P("fsdp")),
) + HEAD_RULES
