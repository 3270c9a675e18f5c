"""Loss pieces the token-level tasks share (causal_lm, seq2seq)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits, targets, label_smoothing: float = 0.0):
    """Per-token cross-entropy in float32: logsumexp - target logit (log_softmax without a one-hot or a copy)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing > 0:  # CE against (1 - a) * onehot + a / V
        nll = (1.0 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(axis=-1))
    return nll
