"""Multi-host runs: `python -m jaxsft.run --multihost` as 2 processes × 2 CPU devices over jax.distributed on
127.0.0.1 (gloo collectives) trains like 1 process × 4 devices, its checkpoint restores in one process on another
mesh, and a killed process makes the other one exit instead of hanging."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, synthetic_rows, write_tsv

pytestmark = [pytest.mark.multihost, pytest.mark.slow]  # each test starts several JAX processes (~1-3 min)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(devices: int, **extra) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def run_args(model, data, workdir, *extra) -> list[str]:
    return ["--config", "configs/classify.py", "--workdir", str(workdir), f"--config.model.name_or_path={model}",
            f"--config.data.train={data / 'train.tsv'}", f"--config.data.eval={data / 'eval.tsv'}",
            "--config.max_length=64", "--config.data.buckets=64", "--config.batch_size=16",
            "--config.learning_rate=1e-3", "--config.log_every_steps=1", "--config.warmup_steps=0", *extra]


def start_processes(args, logs, n: int = 2, devices: int = 2, module: str = "jaxsft.run",
                    flag: tuple = ("--multihost",), **env) -> list[subprocess.Popen]:
    """n processes of one `python -m MODULE --multihost` job (`args`: a list, or i → process i's list; `flag=()`:
    left to detection from JAX_NUM_PROCESSES); process i writes logs/i.out and logs/i.err (files: a full pipe
    would stall it)."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    argv = args if callable(args) else lambda i: args
    return [subprocess.Popen([sys.executable, "-m", module, *flag, *map(str, argv(i))], cwd=ROOT,
                             env=env_for(devices, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                         JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i), **env),
                             stdout=open(logs / f"{i}.out", "w"), stderr=open(logs / f"{i}.err", "w"))
            for i in range(n)]


def finish(procs, logs, timeout: int = 600) -> list[tuple[int, str, str]]:
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.time(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
            for i, p in enumerate(procs)]


def last_line(err: str) -> str:
    """A process's closing stderr line, skipping the lines gloo (the CPU backend's collectives; GPUs and TPUs have
    none) prints from C++ whenever it connects a new communicator — one may land after the CLI's last line."""
    return [line for line in err.strip().splitlines() if not line.startswith("[Gloo]")][-1]


def run_single(module: str, *args, devices: int = 4) -> dict:
    p = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env_for(devices),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def data_counts(workdir) -> dict:
    """The run's first metrics row: what the data held (empty, cut, duplicate examples)."""
    row = json.loads(open(workdir / "metrics.jsonl").readline())
    return {k: v for k, v in row.items() if k.startswith("data_")}


def losses(workdir) -> list[float]:
    return [json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl") if '"loss"' in line]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("multihost_data")
    write_tsv(d / "train.tsv", synthetic_rows(96, 1))
    write_tsv(d / "eval.tsv", synthetic_rows(32, 2))
    return d


def test_two_processes_train_like_one_and_the_checkpoint_restores_on_another_mesh(tiny_bert, data, tmp_path):
    steps = ["--config.max_steps=6", "--config.eval_every_steps=6"]
    # fsdp across the two processes, tensor within each: every parameter is split between the hosts.
    multi = tmp_path / "multi"
    results = finish(start_processes(run_args(tiny_bert, data, multi, *steps, "--config.mesh.data=1",
                                              "--config.mesh.fsdp=2", "--config.mesh.tensor=2"), tmp_path / "logs"),
                     tmp_path / "logs")
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i} failed ({rc}):\n{err[-3000:]}"
    printed = [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for _, out, _ in results]
    assert len(printed[0]) == 1 and not printed[1]  # only process 0 prints the result (gloo prints its own lines)
    final = printed[0][0]
    # Each process collates only the rows of the global batch (16) that its own devices hold.
    rows = [re.findall(r"process (\d) builds rows (\d+):(\d+) of each global batch of (\d+)", err)
            for _, _, err in results]
    assert rows == [[("0", "0", "8", "16")], [("1", "8", "16", "16")]], rows
    # ... and tokenized only its half of the training set up front (the lengths of the rest are gathered).
    scanned = [re.findall(r"data.train: process (\d) tokenized rows (\d+):(\d+) of (\d+)", err)
               for _, _, err in results]
    assert scanned == [[("0", "0", "48", "96")], [("1", "48", "96", "96")]], scanned
    env = json.loads((multi / "environment.json").read_text())
    assert env["process_count"] == 2 and len(env["devices"]) == 4
    multi_losses = losses(multi)
    assert len(multi_losses) == 6  # ... and writes metrics (one row per step)

    single = tmp_path / "single"
    single_final = run_single("jaxsft.run", *run_args(tiny_bert, data, single, *steps))
    np.testing.assert_allclose(multi_losses, losses(single), atol=1e-5, rtol=0)
    assert data_counts(multi) == data_counts(single) and "data_train_duplicates" in data_counts(multi)
    assert abs(final["eval_loss"] - single_final["eval_loss"]) < 1e-5

    # The checkpoint the two processes wrote (sharded across them) restores in one process on another mesh.
    restored = run_single("jaxsft.evaluate", "--workdir", multi, "--checkpoint", "latest", "--config.mesh.data=2",
                          "--config.mesh.fsdp=1", "--config.mesh.tensor=2")
    assert restored["step"] == 6
    assert abs(restored["eval_loss"] - final["eval_loss"]) < 1e-5
    assert restored["eval_accuracy"] == final["eval_accuracy"]

    # Export gathers the sharded params to the host: on the run's mesh (4 devices) and on 1 device (the mesh
    # does not fit, so it falls back to data-parallel) the files are the same.
    from safetensors.numpy import load_file

    for devices in (4, 1):
        p = subprocess.run([sys.executable, "-m", "jaxsft.export", "--workdir", str(multi), "--output",
                            str(tmp_path / f"hf{devices}"), "--checkpoint", "latest"], cwd=ROOT, env=env_for(devices),
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(tmp_path / "hf4" / "model.safetensors"), load_file(tmp_path / "hf1" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_two_processes_pack_and_train_sft_like_one(tiny_llama, tmp_path):
    """Packed SFT: each process tokenizes half the examples; rows are packed from the gathered lengths, so the
    batches (and losses) are those of one process holding every example."""
    from conftest import alpaca_rows, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(80, 3))
    args = lambda w: ["--config", "configs/sft.py", "--workdir", str(w), f"--config.model.name_or_path={tiny_llama}",  # noqa: E731
                      f"--config.data.train={tmp_path / 'train.jsonl'}", "--config.max_steps=4",
                      "--config.max_length=128", "--config.batch_size=8", "--config.dtype=float32",
                      "--config.log_every_steps=1", "--config.warmup_steps=0", "--config.learning_rate=1e-3",
                      "--config.data.eval_fraction=0", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                      "--config.mesh.tensor=1"]
    results = finish(start_processes(args(tmp_path / "multi"), tmp_path / "logs"), tmp_path / "logs")
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i} failed ({rc}):\n{err[-3000:]}"
    assert all(f"data.train: process {i} tokenized rows {40 * i}:{40 * (i + 1)} of 80" in err
               for i, (_, _, err) in enumerate(results))
    run_single("jaxsft.run", *args(tmp_path / "single"))
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert len(multi) == 4
    np.testing.assert_allclose(multi, single, atol=1e-5, rtol=0)
    assert data_counts(tmp_path / "multi") == data_counts(tmp_path / "single")
    assert data_counts(tmp_path / "single")["data_train_duplicates"] > 0  # alpaca_rows repeats examples


def test_two_processes_train_translation_and_score_bleu_like_one(tmp_path):
    """seq2seq: the training pairs shared out, the eval set decoded (beam search) on the global mesh; the losses,
    eval loss and BLEU equal a 1-process run's."""
    from conftest import make_tiny_seq2seq, parallel_rows, write_parallel

    model = make_tiny_seq2seq(tmp_path / "marian")
    train = write_parallel(tmp_path, "train", parallel_rows(64, seed=0))
    evals = write_parallel(tmp_path, "val", parallel_rows(8, seed=1))
    args = lambda w: ["--config", "configs/translate.py", "--workdir", str(w),  # noqa: E731
                      f"--config.model.name_or_path={model}", f"--config.data.train={train}",
                      f"--config.data.eval={evals}", "--config.max_steps=4", "--config.eval_every_steps=4",
                      "--config.batch_size=8", "--config.learning_rate=3e-3", "--config.log_every_steps=1",
                      "--config.warmup_ratio=0", "--config.decode.num_beams=2", "--config.decode.max_new_tokens=8",
                      "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1"]
    results = finish(start_processes(args(tmp_path / "multi"), tmp_path / "logs"), tmp_path / "logs")
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i} failed ({rc}):\n{err[-3000:]}"
    assert all(f"data.train: process {i} tokenized rows {32 * i}:{32 * (i + 1)} of 64" in err
               for i, (_, _, err) in enumerate(results))
    multi_final = json.loads(results[0][1].strip().splitlines()[-1])
    single_final = run_single("jaxsft.run", *args(tmp_path / "single"))
    np.testing.assert_allclose(losses(tmp_path / "multi"), losses(tmp_path / "single"), atol=1e-5, rtol=0)
    assert abs(multi_final["eval_loss"] - single_final["eval_loss"]) < 1e-5
    assert multi_final["eval_bleu"] == single_final["eval_bleu"]
    assert multi_final["eval_chrf"] == single_final["eval_chrf"] > 0, (multi_final, single_final)  # same hypotheses


def test_a_bad_row_in_one_process_share_stops_every_process_with_its_line(tiny_bert, tmp_path):
    """Launched without --multihost: the processes find each other from JAX_NUM_PROCESSES (the row is in process
    1's half, so process 0 can only name it if they joined)."""
    rows = synthetic_rows(40, 1)
    rows[30] = (rows[30][0], "meh")  # in the second process's half; not one of data.label_names
    write_tsv(tmp_path / "train.tsv", rows)
    args = run_args(tiny_bert, tmp_path, tmp_path / "w", "--config.data.eval=", "--config.data.eval_fraction=0",
                    "--config.data.label_names=negative,positive", "--config.max_steps=2")
    results = finish(start_processes(args, tmp_path / "logs", flag=()), tmp_path / "logs", timeout=300)
    assert "multi-host launch detected (JAX_NUM_PROCESSES=2)" in results[0][2]
    for i, (rc, _, err) in enumerate(results):
        assert rc == 2 and last_line(err) == ("error: data.train: label 'meh' (row 30) is not in the label set "
                                             "['negative', 'positive'] (data.label_names, or the labels seen in "
                                             "data.train)"), (i, rc, err[-2000:])
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_killed_process_makes_the_other_exit_instead_of_hanging(tiny_bert, data, tmp_path):
    w = tmp_path / "w"
    logs = tmp_path / "logs"
    procs = start_processes(run_args(tiny_bert, data, w, "--config.max_steps=100000",
                                     "--config.eval_every_steps=100000"), logs)
    try:
        deadline = time.time() + 400
        while not (w / "metrics.jsonl").is_file() or '"loss"' not in (w / "metrics.jsonl").read_text():
            assert time.time() < deadline, "training did not start"
            assert all(p.poll() is None for p in procs), (logs / "0.err").read_text()[-3000:]
            time.sleep(1)
        procs[1].send_signal(signal.SIGKILL)  # a worker dies: only the heartbeat can tell (the coordinator's
        t0 = time.time()                      # death is noticed at once)
        try:
            procs[0].wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 still runs 90 s after process 1 was killed")
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    err = (logs / "0.err").read_text()
    print(f"process 0 exited with code {procs[0].returncode} {elapsed:.1f} s after process 1 was killed")
    assert procs[0].returncode != 0
    assert elapsed < 60, elapsed
    assert "another task died" in err or "heartbeat" in err, err[-2000:]


def test_sigterm_on_one_host_stops_every_process_at_the_same_step_and_the_rerun_resumes(tiny_bert, data, tmp_path):
    """A preemption notice reaches one host: every process saves the same checkpoint, exits 75 with one line, and
    rerunning the same launch resumes to the end (JAX's preemption sync decides the step)."""
    w = tmp_path / "w"
    steps = 300
    args = run_args(tiny_bert, data, w, f"--config.max_steps={steps}", f"--config.eval_every_steps={steps}",
                    f"--config.checkpoint_every_steps={steps}")
    procs = start_processes(args, tmp_path / "logs")
    try:
        deadline = time.time() + 400
        while not (w / "metrics.jsonl").is_file() or '"loss"' not in (w / "metrics.jsonl").read_text():
            assert time.time() < deadline, "training did not start"
            assert all(p.poll() is None for p in procs), (tmp_path / "logs" / "0.err").read_text()[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # only the second host gets the notice
    finally:
        results = finish(procs, tmp_path / "logs", timeout=120)
    stopped = re.compile(r"stopped at step (\d+) on SIGTERM; checkpoint saved in (\S+) — rerun the same command to "
                         r"resume")
    lines = [last_line(err) for _, _, err in results]
    assert [rc for rc, _, _ in results] == [75, 75], lines
    matches = [stopped.fullmatch(line) for line in lines]
    assert all(matches), lines
    step = int(matches[0][1])
    assert int(matches[1][1]) == step and 0 < step < steps
    assert all("preemption notice: every process stops after step" in err for _, _, err in results)
    assert (w / "checkpoints" / str(step)).is_dir()

    rerun = finish(start_processes(args, tmp_path / "logs2"), tmp_path / "logs2")
    assert [rc for rc, _, _ in rerun] == [0, 0], rerun[0][2][-3000:]
    assert f"resuming from step {step}" in rerun[0][2]
    assert json.loads(rerun[0][1].strip().splitlines()[-1])["step"] == steps
