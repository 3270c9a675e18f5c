"""Host-side metrics from model outputs (float64 numpy, so training eval and `jaxsft.evaluate` agree exactly)."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def classification(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Loss, accuracy, macro F1 and Matthews correlation, with scikit-learn's definitions (f1_score(average="macro",
    zero_division=0) over all K classes; multiclass MCC), from the confusion matrix: no sklearn import (1.3 s)."""
    k = logits.shape[-1]
    pred = logits.argmax(-1)
    nll = -log_softmax(logits)[np.arange(len(labels)), labels]
    cm = np.bincount(labels.astype(np.int64) * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    tp, true, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    denom = true + predicted  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    n, correct = cm.sum(), np.trace(cm)
    cov_tp, cov_pp, cov_tt = correct * n - true @ predicted, n * n - predicted @ predicted, n * n - true @ true
    return {
        "loss": float(nll.mean()),
        "accuracy": float((pred == labels).mean()),
        "f1": float(f1.mean()),
        "mcc": 0.0 if cov_pp * cov_tt == 0 else float(cov_tp / np.sqrt(cov_tt * cov_pp)),
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
