"""DistilBERT for sequence classification, as transformers' DistilBertForSequenceClassification: word + position
embeddings (no token types; positions learned, or the sinusoidal table when `sinusoidal_pos_embds`, stored in the
checkpoint and trainable as in transformers 5), post-LN blocks (q_lin/k_lin/v_lin/out_lin → sa_layer_norm,
ffn lin1/lin2 → output_layer_norm), and a head pre_classifier → ReLU → dropout → classifier on the first token.

Module attribute names mirror transformers' PyTorch modules, so a parameter path joined with dots is its HF name
under the standard rule (`kernel`→`weight` transposed, `scale`/`embedding`→`weight`): import and export share it.
The layer stack takes BERT's `remat` / `scan_layers` (bert.BertEncoder's mechanism).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.models import bert
from jaxsft.models.bert import BertEncoder
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

MODEL_TYPES = ("distilbert",)
EPS = 1e-12  # transformers' DistilBERT LayerNorms (not in its config)


def sinusoidal_table(n_pos: int, dim: int) -> np.ndarray:
    """transformers' create_sinusoidal_embeddings: sin on even columns, cos on odd ones (float64 → float32)."""
    pos = np.arange(n_pos, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angle = pos / np.power(10000, 2 * (j // 2) / dim)
    return np.where(j % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


class Embeddings(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.word_embeddings = embed(cfg.vocab_size, cfg.dim, dtype=dtype, rngs=rngs, std=std)
        self.position_embeddings = embed(cfg.max_position_embeddings, cfg.dim, dtype=dtype, rngs=rngs, std=std)
        if cfg.sinusoidal_pos_embds:
            self.position_embeddings.embedding.value = jnp.asarray(
                sinusoidal_table(cfg.max_position_embeddings, cfg.dim))
        self.LayerNorm = LayerNorm(cfg.dim, eps=EPS, rngs=rngs)
        self.rate = cfg.dropout

    def __call__(self, input_ids, rng):
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return dropout(self.LayerNorm(x), self.rate, rng)


class DistilBertSelfAttention(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, std = cfg.dim, cfg.initializer_range
        self.num_heads = cfg.n_heads
        self.q_lin = dense(d, d, dtype=dtype, rngs=rngs, std=std)
        self.k_lin = dense(d, d, dtype=dtype, rngs=rngs, std=std)
        self.v_lin = dense(d, d, dtype=dtype, rngs=rngs, std=std)
        self.out_lin = dense(d, d, dtype=dtype, rngs=rngs, std=std)
        self.rate = cfg.attention_dropout

    def __call__(self, x, mask, rng):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        ctx = attention(split(self.q_lin(x)), split(self.k_lin(x)), split(self.v_lin(x)), mask,
                        dropout_rate=self.rate, rng=rng)
        return self.out_lin(ctx.reshape(b, t, d))  # no dropout on the attention output, as transformers


class FFN(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        std = cfg.initializer_range
        self.lin1 = dense(cfg.dim, cfg.hidden_dim, dtype=dtype, rngs=rngs, std=std)
        self.lin2 = dense(cfg.hidden_dim, cfg.dim, dtype=dtype, rngs=rngs, std=std)
        self.act = activation(cfg.activation)
        self.rate = cfg.dropout

    def __call__(self, x, rng):
        return dropout(self.lin2(self.act(self.lin1(x))), self.rate, rng)


class TransformerBlock(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.attention = DistilBertSelfAttention(cfg, dtype, rngs)
        self.sa_layer_norm = LayerNorm(cfg.dim, eps=EPS, rngs=rngs)
        self.ffn = FFN(cfg, dtype, rngs)
        self.output_layer_norm = LayerNorm(cfg.dim, eps=EPS, rngs=rngs)

    def __call__(self, x, mask, rng):
        h = self.sa_layer_norm(self.attention(x, mask, sub_rng(rng, 0)) + x)
        return self.output_layer_norm(self.ffn(h, sub_rng(rng, 1)) + h)


class Transformer(BertEncoder):
    """BERT's layer stack (per-layer, or scanned under `lax.scan`; `remat`) over DistilBERT blocks."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, remat: str = "none", scan_layers: bool = False):
        layers = [TransformerBlock(cfg, dtype, rngs) for _ in range(cfg.n_layers)]
        self.remat, self.scan_layers = remat, bool(scan_layers)
        remat_policy(remat)  # checks the name
        if self.scan_layers:
            graphdef, states = nnx.split(layers[0])[0], [nnx.split(layer)[1] for layer in layers]
            self.layer = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
            self.num_layers = len(layers)
        else:
            self.layer = nnx.List(layers)


class DistilBertModel(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs, **options):
        self.embeddings = Embeddings(cfg, dtype, rngs)
        self.transformer = Transformer(cfg, dtype, rngs, **options)

    def __call__(self, input_ids, attention_mask, *, rng=None):
        mask = attention_mask.astype(bool)[:, None, None, :]
        x = split_batch(self.embeddings(input_ids, sub_rng(rng, 1000)))
        return self.transformer(x, mask, sub_rng(rng, 1001))


class DistilBertForSequenceClassification(nnx.Module):
    """First token → pre_classifier → ReLU → dropout → classifier, as transformers'
    DistilBertForSequenceClassification. token_type_ids are accepted and ignored (DistilBERT has none)."""

    base_prefix = "distilbert"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        std = cfg.initializer_range
        self.distilbert = DistilBertModel(cfg, dtype, rngs, **options)
        self.pre_classifier = dense(cfg.dim, cfg.dim, dtype=dtype, rngs=rngs, std=std)
        self.classifier = dense(cfg.dim, cfg.num_labels, dtype=dtype, rngs=rngs, std=std)
        self.rate = cfg.seq_classif_dropout

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, rng=None):
        hidden = self.distilbert(input_ids, attention_mask, rng=rng)
        pooled = dropout(jax.nn.relu(self.pre_classifier(hidden[:, 0])), self.rate, sub_rng(rng, 2000))
        return self.classifier(pooled).astype(jnp.float32)


def sequence_classification(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    """options: remat, scan_layers (config.model.*), as the BERT family."""
    return DistilBertForSequenceClassification(cfg, dtype, rngs=rngs, **options)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return "DistilBertForSequenceClassification"


def normalize_hf_key(key: str, base_prefix: str) -> str:
    """Maps checkpoint names onto ours: base-model (DistilBertModel) checkpoints lack the `distilbert.` prefix."""
    if key.startswith(("embeddings.", "transformer.")):
        key = f"{base_prefix}.{key}"
    return key


# DistilBertForMaskedLM's head (the hub's distilbert-base-* checkpoints carry it): not part of the classifier.
IGNORED_HF_KEYS = ("position_ids",) + tuple(f"{head}.{leaf}" for head in ("vocab_transform", "vocab_layer_norm",
                                                                          "vocab_projector")
                                            for leaf in ("weight", "bias"))
OPTIONS = bert.OPTIONS


# Sharding (see parallel.py): regex over flat param names → PartitionSpec; kernels are (in, out), as bert.py's.
PARTITION_RULES = (
    (r"embeddings\.word_embeddings\.embedding$", P("tensor", "fsdp")),
    (r"embeddings\.position_embeddings\.embedding$", P(None, "fsdp")),
    (r"attention\.(q_lin|k_lin|v_lin)\.kernel$", P("fsdp", "tensor")),
    (r"attention\.(q_lin|k_lin|v_lin)\.bias$", P("tensor")),
    (r"attention\.out_lin\.kernel$", P("tensor", "fsdp")),
    (r"ffn\.lin1\.kernel$", P("fsdp", "tensor")),
    (r"ffn\.lin1\.bias$", P("tensor")),
    (r"ffn\.lin2\.kernel$", P("tensor", "fsdp")),
    (r"^pre_classifier\.kernel$", P("fsdp")),
) + HEAD_RULES
