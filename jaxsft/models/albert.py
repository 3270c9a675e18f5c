"""ALBERT for sequence classification, as transformers' AlbertForSequenceClassification: BERT's embeddings of width
`embedding_size` (ELECTRA's, electra.py), `embedding_hidden_mapping_in` up to `hidden_size`, then
`num_hidden_layers` applications of shared layer groups (cross-layer parameter sharing: `num_hidden_groups` groups
of `inner_group_num` post-LN layers each, layer i running group int(i / (num_hidden_layers / num_hidden_groups))),
and the pooler ([CLS] → dense → tanh) → dropout → classifier.

Module attribute names mirror transformers' PyTorch modules, so a parameter path joined with dots is its HF name
under the standard rule (`kernel`→`weight` transposed, `scale`/`embedding`→`weight`): import and export share it.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.errors import UserError
from jaxsft.models import bert
from jaxsft.models.bert import BertSelfAttention, _run_layer
from jaxsft.models.electra import ElectraEmbeddings
from jaxsft.models.layers import (
    F32,
    HEAD_RULES,
    LayerNorm,
    activation,
    dense,
    dropout,
    padding_mask,
    remat_policy,
    split_batch,
    sub_rng,
)

MODEL_TYPES = ("albert",)


def group_of_layer(cfg) -> tuple[int, ...]:
    """The shared group each of the num_hidden_layers applications runs, as transformers' AlbertTransformer picks it."""
    layers, groups = cfg.num_hidden_layers, cfg.num_hidden_groups
    if not (1 <= groups <= layers and cfg.inner_group_num >= 1):
        raise UserError(f"albert: num_hidden_groups={groups} with num_hidden_layers={layers} and inner_group_num="
                        f"{cfg.inner_group_num} is not supported (needs 1 <= num_hidden_groups <= num_hidden_layers "
                        "and inner_group_num >= 1)")
    return tuple(int(i / (layers / groups)) for i in range(layers))


class AlbertEmbeddings(ElectraEmbeddings):
    """word + position + token type embeddings of width `embedding_size` → LayerNorm → dropout."""


class AlbertAttention(BertSelfAttention):
    """BERT's self-attention (query/key/value) with its output dense and post-LN in the same module, as HF's."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype, rngs)
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs)
        self.output_rate = cfg.hidden_dropout_prob

    def __call__(self, x, mask, rng):
        ctx = super().__call__(x, mask, sub_rng(rng, 0))
        return self.LayerNorm(x + dropout(self.dense(ctx), self.output_rate, sub_rng(rng, 1)))


class AlbertLayer(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.full_layer_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs)
        self.attention = AlbertAttention(cfg, dtype, rngs)
        self.ffn = dense(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs, std=std)
        self.ffn_output = dense(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=std)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x, mask, rng):
        h = self.attention(x, mask, rng)
        return self.full_layer_layer_norm(self.ffn_output(self.act(self.ffn(h))) + h)  # no dropout here, as HF


class AlbertLayerGroup(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.albert_layers = nnx.List([AlbertLayer(cfg, dtype, rngs) for _ in range(cfg.inner_group_num)])

    def __call__(self, x, mask, rng):
        for j, layer in enumerate(self.albert_layers):
            x = layer(x, mask, sub_rng(rng, j))
        return x


class AlbertTransformer(nnx.Module):
    """The embedding projection and the shared groups. `remat` as the BERT family; `scan_layers` runs the
    consecutive applications of one group under `jax.lax.scan` (its body compiled once per group; the parameters
    are shared, not stacked, so their names do not change)."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, remat: str = "none", scan_layers: bool = False):
        self.group_of = group_of_layer(cfg)
        remat_policy(remat)  # checks the name
        self.embedding_hidden_mapping_in = dense(cfg.embedding_size, cfg.hidden_size, dtype=dtype, rngs=rngs,
                                                 std=cfg.initializer_range)
        self.albert_layer_groups = nnx.List([AlbertLayerGroup(cfg, dtype, rngs)
                                             for _ in range(cfg.num_hidden_groups)])
        self.remat, self.scan_layers = remat, bool(scan_layers)

    def __call__(self, x, mask, rng):
        x = split_batch(self.embedding_hidden_mapping_in(x))
        policy = remat_policy(self.remat)
        layer = 0
        for group, run in itertools.groupby(self.group_of):
            graphdef, state = nnx.split(self.albert_layer_groups[group])

            def apply(state, h, i, graphdef=graphdef):
                return split_batch(_run_layer(graphdef, state, h, mask, sub_rng(rng, i)))

            if policy is not None:
                apply = jax.checkpoint(apply, policy=policy, prevent_cse=False)
            indices = range(layer, layer + len(list(run)))
            if self.scan_layers:
                x = jax.lax.scan(lambda h, i, apply=apply, state=state: (apply(state, h, i), None), x,
                                 jnp.asarray(indices, jnp.int32))[0]
            else:
                for i in indices:
                    x = apply(state, x, i)
            layer = indices.stop
        return x


class AlbertModel(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs, **options):
        self.embeddings = AlbertEmbeddings(cfg, dtype, rngs)
        self.encoder = AlbertTransformer(cfg, dtype, rngs, **options)
        self.pooler = dense(cfg.hidden_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=cfg.initializer_range)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = split_batch(self.embeddings(input_ids, token_type_ids, sub_rng(rng, 1000)))
        return self.encoder(x, padding_mask(attention_mask), sub_rng(rng, 1001))


class AlbertForSequenceClassification(nnx.Module):
    """Pooler ([CLS] → dense → tanh) → dropout → classifier, as transformers' AlbertForSequenceClassification."""

    base_prefix = "albert"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        self.albert = AlbertModel(cfg, dtype, rngs, **options)
        self.classifier = dense(cfg.hidden_size, cfg.num_labels, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.rate = cfg.classifier_dropout_prob

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        hidden = self.albert(input_ids, attention_mask, token_type_ids, rng=rng)
        pooled = dropout(jnp.tanh(self.albert.pooler(hidden[:, 0])), self.rate, sub_rng(rng, 2000))
        return self.classifier(pooled).astype(F32)


def sequence_classification(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    """options: remat, scan_layers (config.model.*)."""
    return AlbertForSequenceClassification(cfg, dtype, rngs=rngs, **options)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return "AlbertForSequenceClassification"


def normalize_hf_key(key: str, base_prefix: str) -> str:
    """Maps checkpoint names onto ours: base-model (AlbertModel) checkpoints lack the `albert.` prefix; old ones say
    LayerNorm gamma/beta."""
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith(("embeddings.", "encoder.", "pooler.")):
        key = f"{base_prefix}.{key}"
    return key


# The pre-training heads the hub's checkpoints carry (AlbertForMaskedLM's `predictions`, AlbertForPreTraining's
# sentence-order head): not part of the classifier, so not reported as unused.
IGNORED_HF_KEYS = ("position_ids", "token_type_ids", "predictions.bias") + tuple(
    f"{head}.{leaf}" for head in ("predictions.dense", "predictions.LayerNorm", "predictions.decoder",
                                  "sop_classifier.classifier")
    for leaf in ("weight", "bias"))
OPTIONS = bert.OPTIONS


# Sharding (see parallel.py): regex over flat param names → PartitionSpec; kernels are (in, out), as bert.py's.
PARTITION_RULES = (
    (r"embeddings\.word_embeddings\.embedding$", P("tensor", "fsdp")),
    (r"embeddings\.(position|token_type)_embeddings\.embedding$", P(None, "fsdp")),
    (r"embedding_hidden_mapping_in\.kernel$", P(None, "fsdp")),
    (r"attention\.(query|key|value)\.kernel$", P("fsdp", "tensor")),
    (r"attention\.(query|key|value)\.bias$", P("tensor")),
    (r"attention\.dense\.kernel$", P("tensor", "fsdp")),
    (r"\.ffn\.kernel$", P("fsdp", "tensor")),
    (r"\.ffn\.bias$", P("tensor")),
    (r"\.ffn_output\.kernel$", P("tensor", "fsdp")),
    (r"^albert\.pooler\.kernel$", P("fsdp")),
) + HEAD_RULES
