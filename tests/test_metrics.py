"""Classification metrics equal scikit-learn's (macro F1 with zero_division=0 over all classes, multiclass MCC)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxsft import metrics

sk = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("k,n,seed", [(2, 50, 0), (3, 7, 1), (6, 200, 2), (4, 3, 3), (2, 10, 4)])
def test_f1_and_mcc_equal_sklearn(k, n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.standard_normal((n, k)).astype(np.float32)
    if seed == 4:  # one predicted class only: MCC's degenerate case
        logits[:, 0] += 100
    m = metrics.classification(logits, labels)
    pred = logits.argmax(-1)
    assert m["accuracy"] == pytest.approx(float((pred == labels).mean()), abs=0)
    assert m["f1"] == pytest.approx(sk.f1_score(labels, pred, average="macro", labels=np.arange(k), zero_division=0),
                                    rel=1e-12, abs=1e-15)
    assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(labels, pred), rel=1e-12, abs=1e-15)
