"""A signal while a run loads, tokenizes or compiles stops it within seconds, with one line and exit 75."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, synthetic_rows, write_tsv
from test_bad_input import good_args
from test_bad_input import models as models  # noqa: F401 - the tiny-model fixture


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_loading_stops_at_once_with_exit_75(sig, models, tmp_path):  # noqa: F811
    train = write_tsv(tmp_path / "train.tsv", synthetic_rows(400))
    w = tmp_path / "w"
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "jaxsft.run", *good_args({"model": models["model"], "good": train},
                                                                            w)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in proc.stderr:  # "labels inferred" is logged while the training set is read
            lines.append(line)
            if "labels inferred" in line:
                break
        sent = time.monotonic()
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=60)
        waited = time.monotonic() - sent
    finally:
        proc.kill()
    out = rest.strip().splitlines()
    assert proc.returncode == 75, "".join(lines) + rest
    assert waited < 10, f"took {waited:.1f} s to stop"
    assert out[-1].startswith(f"stopped on {sig.name} before the first step"), rest
    assert not (w / "checkpoints").exists()
