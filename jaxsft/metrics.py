"""Host-side metrics from model outputs (float64 numpy, so training eval and `jaxsft.evaluate` agree exactly)."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def classification(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import f1_score, matthews_corrcoef

    pred = logits.argmax(-1)
    nll = -log_softmax(logits)[np.arange(len(labels)), labels]
    return {
        "loss": float(nll.mean()),
        "accuracy": float((pred == labels).mean()),
        "f1": float(f1_score(labels, pred, average="macro", labels=np.arange(logits.shape[-1]), zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, pred)),
    }


def regression(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    p, y = predictions.astype(np.float64), labels.astype(np.float64)
    constant = np.ptp(p) == 0 or np.ptp(y) == 0
    return {
        "loss": float(((p - y) ** 2).mean()),
        "pearson": 0.0 if constant else float(pearsonr(p, y)[0]),
        "spearman": 0.0 if constant else float(spearmanr(p, y)[0]),
    }
