"""ELECTRA (discriminator / generator checkpoints) for sequence classification, as transformers'
ElectraForSequenceClassification: BERT's layers (bert.py) under embeddings of `embedding_size`, projected to
`hidden_size` by `embeddings_project` when the two differ, and a head dense → gelu → dropout → out_proj on the
first token (no pooler).

Module attribute names mirror transformers' PyTorch modules, so a parameter path joined with dots is its HF name
under the standard rule (`kernel`→`weight` transposed, `scale`/`embedding`→`weight`): import and export share it.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.models import bert
from jaxsft.models.bert import BertEmbeddings, BertEncoder, _classifier_dropout
from jaxsft.models.layers import dense, dropout, split_batch, sub_rng

MODEL_TYPES = ("electra",)


class ElectraEmbeddings(BertEmbeddings):
    """BERT's embeddings (word + position + token type → LayerNorm → dropout) of width `embedding_size`."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        narrow = copy.copy(cfg)
        narrow.hidden_size = cfg.embedding_size
        super().__init__(narrow, dtype, rngs)


class ElectraModel(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs, **options):
        self.embeddings = ElectraEmbeddings(cfg, dtype, rngs)
        self.embeddings_project = (dense(cfg.embedding_size, cfg.hidden_size, dtype=dtype, rngs=rngs,
                                         std=cfg.initializer_range)
                                   if cfg.embedding_size != cfg.hidden_size else None)
        self.encoder = BertEncoder(cfg, dtype, rngs, **options)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = attention_mask.astype(bool)[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids, sub_rng(rng, 1000))
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)
        return self.encoder(split_batch(x), mask, sub_rng(rng, 1001))


class ElectraClassificationHead(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.dense = dense(cfg.hidden_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=std)
        self.out_proj = dense(cfg.hidden_size, cfg.num_labels, dtype=dtype, rngs=rngs, std=std)
        self.rate = _classifier_dropout(cfg)

    def __call__(self, hidden, rng):
        x = dropout(hidden[:, 0], self.rate, sub_rng(rng, 0))
        x = jax.nn.gelu(self.dense(x), approximate=False)  # transformers' get_activation("gelu"): exact erf
        return self.out_proj(dropout(x, self.rate, sub_rng(rng, 1)))


class ElectraForSequenceClassification(nnx.Module):
    """First token → dropout → dense → gelu → dropout → out_proj, as transformers' ElectraForSequenceClassification."""

    base_prefix = "electra"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        self.electra = ElectraModel(cfg, dtype, rngs, **options)
        self.classifier = ElectraClassificationHead(cfg, dtype, rngs)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        hidden = self.electra(input_ids, attention_mask, token_type_ids, rng=rng)
        return self.classifier(hidden, sub_rng(rng, 2000)).astype(jnp.float32)


def sequence_classification(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    """options: remat, scan_layers (config.model.*), as the BERT family."""
    return ElectraForSequenceClassification(cfg, dtype, rngs=rngs, **options)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return "ElectraForSequenceClassification"


def normalize_hf_key(key: str, base_prefix: str) -> str:
    """Maps checkpoint names onto ours: base-model (ElectraModel) checkpoints lack the `electra.` prefix; old ones
    say LayerNorm gamma/beta."""
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith(("embeddings.", "embeddings_project.", "encoder.")):
        key = f"{base_prefix}.{key}"
    return key


# The pre-training heads the hub's checkpoints carry (ElectraForPreTraining's discriminator, ElectraForMaskedLM's
# generator): not part of the classifier, so not reported as unused.
IGNORED_HF_KEYS = ("position_ids", "token_type_ids") + tuple(
    f"{head}.{leaf}" for head in ("discriminator_predictions.dense", "discriminator_predictions.dense_prediction",
                                  "generator_predictions.dense", "generator_predictions.LayerNorm",
                                  "generator_lm_head")
    for leaf in ("weight", "bias"))
OPTIONS = bert.OPTIONS


# Sharding (see parallel.py): BERT's rules (the layers are BERT's), plus the embedding projection.
PARTITION_RULES = (
    (r"embeddings_project\.kernel$", P(None, "fsdp")),
) + bert.PARTITION_RULES
