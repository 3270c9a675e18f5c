"""export / evaluate / generate with `--multihost`: 2 processes × 2 CPU devices over jax.distributed on 127.0.0.1,
on a mesh that splits every parameter between the processes (fsdp=2 across them, tensor=2 within each). Every
process does the collective work, process 0 alone writes files and prints; the results equal one process's on the
same mesh. Each process gets its own output path (as hosts with their own disks would), so a file process 1 wrote
would show."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, synthetic_rows, write_tsv
from test_multihost import env_for, finish, last_line, run_args, run_single, start_processes

pytestmark = [pytest.mark.multihost, pytest.mark.slow]  # each test starts several JAX processes

MESH = ("--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")


def one_process(module: str, *args) -> list[dict]:
    """`python -m MODULE ARGS` as one process on 4 CPU devices (the same mesh): its stdout's JSON lines."""
    p = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env_for(4),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def ok(results) -> None:
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i} failed ({rc}):\n{err[-3000:]}"


@pytest.fixture(scope="module")
def workdir(tiny_bert, tmp_path_factory):
    """A tiny BERT trained 2 steps by one process on the 4-device mesh (its config keeps that mesh)."""
    data = tmp_path_factory.mktemp("multihost_cli")
    write_tsv(data / "train.tsv", synthetic_rows(96, 1))
    write_tsv(data / "eval.tsv", synthetic_rows(32, 2))
    w = data / "w"
    run_single("jaxsft.run", *run_args(tiny_bert, data, w, "--config.max_steps=2", "--config.eval_every_steps=2",
                                       *MESH))
    return w


def test_export_writes_sharded_safetensors_from_process_0_only(workdir, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    logs = tmp_path / "logs"
    args = lambda i: ["--workdir", workdir, "--output", tmp_path / f"hf{i}", "--max_shard_size", "20KB"]  # noqa: E731
    results = finish(start_processes(args, logs, module="jaxsft.export"), logs)
    ok(results)
    assert not (tmp_path / "hf1").exists()  # process 1 wrote nothing, not even the folder
    assert [out for _, out, _ in results] == ["", ""]  # nothing on stdout (gloo's lines go to stderr)
    index = json.loads((tmp_path / "hf0" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((tmp_path / "hf0" / s).is_file() for s in shards)
    assert not (tmp_path / "hf0" / "model.safetensors").exists()

    one_process("jaxsft.export", "--workdir", workdir, "--output", tmp_path / "single")
    single = load_file(tmp_path / "single" / "model.safetensors")
    multi = {k: v for s in shards for k, v in load_file(tmp_path / "hf0" / s).items()}
    assert multi.keys() == single.keys() == index["weight_map"].keys()
    assert all(np.array_equal(multi[k], single[k]) for k in single)  # the same bits, gathered across processes

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf0")
    texts = [text for text, _ in synthetic_rows(8, 3)]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = [AutoModelForSequenceClassification.from_pretrained(tmp_path / d).eval()(**batch).logits.numpy()
                  for d in ("hf0", "single")]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-4, rtol=0)

    # Bad input seen by process 0 alone (its --output is not empty; process 1's is): every process stops with
    # one line and exit 2 instead of process 1 waiting in a collective.
    results = finish(start_processes(args, tmp_path / "logs2", module="jaxsft.export"), tmp_path / "logs2")
    for i, (rc, out, err) in enumerate(results):
        assert rc == 2 and out == "", (i, rc, err[-2000:])
        assert last_line(err).startswith("error: --output") and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "hf1").exists()


def test_evaluate_prints_and_writes_once_what_one_process_does(workdir, tmp_path):
    logs = tmp_path / "logs"
    args = lambda i: ["--workdir", workdir, "--predictions", tmp_path / f"pred{i}.jsonl"]  # noqa: E731
    results = finish(start_processes(args, logs, module="jaxsft.evaluate"), logs)
    ok(results)
    assert results[1][1] == "" and not (tmp_path / "pred1.jsonl").exists()
    lines = results[0][1].splitlines()
    assert len(lines) == 1
    multi = json.loads(lines[0])

    [single] = one_process("jaxsft.evaluate", "--workdir", workdir, "--predictions", tmp_path / "single.jsonl")
    assert multi == single and multi["step"] == 2 and multi["num_examples"] == 32
    assert (tmp_path / "pred0.jsonl").read_text() == (tmp_path / "single.jsonl").read_text()


def test_generate_prints_the_completions_once(tiny_llama, tmp_path):
    logs = tmp_path / "logs"
    args = ["--model", tiny_llama, "--prompt", "the cat sat on", "--prompt", "one two three four five six",
            "--max_new_tokens", "6", "--batch_size", "2", *MESH]
    results = finish(start_processes(args, logs, module="jaxsft.generate"), logs)
    ok(results)
    assert results[1][1] == ""
    multi = [json.loads(line) for line in results[0][1].splitlines()]
    single = one_process("jaxsft.generate", *args)
    assert multi == single and len(multi) == 2 and all(row["completion"] for row in multi)
