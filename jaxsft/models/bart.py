"""BART, mBART / mBART-50 and M2M100 / NLLB-200 (dense): the translation families transformers derives from BART,
built from marian.py's classes with the `Layout` each one takes (transformers' module names, see bert.py).

- BART: post-LayerNorm layers, `layernorm_embedding`, learned positions read at slot + 2 (fairseq's offset).
- mBART: pre-LayerNorm layers, `layernorm_embedding`, a final `layer_norm` on encoder and decoder, BART's positions.
- M2M100 (NLLB-200's dense checkpoints): pre-LayerNorm, final `layer_norm`, no layernorm_embedding and no
  final_logits_bias; fairseq's sinusoidal positions (computed, never a parameter) at the padding-aware position ids
  of transformers' `create_position_ids_from_input_ids`: pad tokens read row padding_idx (zeros), the others
  padding_idx + their count of non-pad tokens so far (+ the cached length while decoding).
The language-code tokens and the target language's forced BOS come from the tokenizer and the generation settings
(data.src_lang / data.tgt_lang, decode.forced_bos_token_id: jaxsft/tasks/seq2seq.py, jaxsft/decoding.py).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.models import marian
from jaxsft.models.layers import F32, Embed

MODEL_TYPES = ("bart", "mbart", "m2m_100")
POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding: slot i reads row i + 2


class LearnedPositions(Embed):
    """BartLearnedPositionalEmbedding: max_position_embeddings + 2 learned rows, slot i reading row i + 2."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        super().__init__(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model, dtype=dtype, param_dtype=F32,
                         embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)

    def vectors(self, input_ids, slots, num_slots: int):
        return self(slots + POSITION_OFFSET)


@functools.lru_cache(maxsize=8)
def fairseq_sinusoidal_table(num_positions: int, dim: int, padding_idx: int | None) -> np.ndarray:
    """M2M100SinusoidalPositionalEmbedding.get_embedding in float32 as torch computes it: frequencies
    exp(-k log(10000) / (dim/2 - 1)), sines in the first half of the features, cosines in the second (a zero
    column when dim is odd); the padding row is zeros."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1)))
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * freqs[None, :]
    out = np.concatenate([np.sin(angles), np.cos(angles), np.zeros((num_positions, dim % 2), np.float32)], axis=1)
    if padding_idx is not None:
        out[padding_idx] = 0.0
    return out.astype(np.float32)


class PaddedSinusoidalPositions(nnx.Module):
    """M2M100's positions: the table at transformers' padding-aware position ids; it grows past
    max_position_embeddings + 2 rows as transformers' does (a row's values do not depend on the table's size)."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.padding_idx, self.d_model = int(cfg.pad_token_id), cfg.d_model
        self.min_rows = cfg.max_position_embeddings + POSITION_OFFSET

    def vectors(self, input_ids, slots, num_slots: int):
        """(batch, T, d_model): `slots[0]` is the cached length (0 without a cache), `num_slots` bounds it + T."""
        real = (input_ids != self.padding_idx).astype(jnp.int32)
        positions = (jnp.cumsum(real, axis=1) + slots[0]) * real + self.padding_idx
        rows = max(self.min_rows, self.padding_idx + 1 + num_slots)
        return jnp.take(jnp.asarray(fairseq_sinusoidal_table(rows, self.d_model, self.padding_idx)), positions, axis=0)


LAYOUTS = {
    "bart": marian.Layout(layernorm_embedding=True, positions=LearnedPositions),
    "mbart": marian.Layout(normalize_before=True, layernorm_embedding=True, final_layer_norm=True,
                           positions=LearnedPositions),
    "m2m_100": marian.Layout(normalize_before=True, final_layer_norm=True, final_logits_bias=False,
                             positions=PaddedSinusoidalPositions),
}
ARCHITECTURES = {"bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration",
                 "m2m_100": "M2M100ForConditionalGeneration"}


class BartForConditionalGeneration(marian.MarianMTModel):
    """HF's Bart/MBart/M2M100ForConditionalGeneration: model (shared embeddings, encoder, decoder), lm_head (tied
    unless configured not to), final_logits_bias (BART, mBART)."""

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs):
        super().__init__(cfg, dtype, rngs=rngs, layout=LAYOUTS[cfg.model_type])


def seq2seq_lm(cfg, dtype, rngs: nnx.Rngs) -> nnx.Module:
    return BartForConditionalGeneration(cfg, dtype, rngs=rngs)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return ARCHITECTURES[cfg.model_type]


normalize_hf_key = marian.normalize_hf_key

# Untied (tie_word_embeddings false), transformers 5 gives each stack its own table; a checkpoint saved with the
# tables shared (transformers 4) holds `shared` alone, which they then start from.
WEIGHT_FALLBACKS = {f"model.{stack}.embed_tokens.weight": "model.shared.weight" for stack in ("encoder", "decoder")}

# Tied aliases of the shared table; M2M100's sinusoidal buffer (and fairseq's `_float_tensor`); fairseq's versions.
IGNORED_HF_KEYS = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight",
                   "embed_positions.weights", "embed_positions._float_tensor", "encoder.version", "decoder.version")

# Marian's rules; the learned position table splits its features over 'fsdp' as the token table does.
PARTITION_RULES = ((r"embed_positions\.embedding$", P(None, "fsdp")),) + marian.PARTITION_RULES
