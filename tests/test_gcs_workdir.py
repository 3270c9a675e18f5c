"""A `gs://` workdir end to end against a local GCS emulator (gcp-storage-emulator, in this process): training
writes config, hf/, Orbax checkpoints (TensorStore's GCS driver), metrics.jsonl and TensorBoard events to the
bucket; a crashed run resumes from its newest checkpoint there; evaluate and report read the workdir alone.
Skipped when gcsfs or the emulator is not installed (both are in the `test` extra)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
from http import HTTPStatus

import pytest
from conftest import ROOT, synthetic_rows, write_tsv

import jaxsft.fs  # noqa: F401 - before any gs:// access here: it turns gcsfs's listing cache off

if importlib.util.find_spec("gcsfs") is None:  # not imported here: the fixture's environment must come first
    pytest.skip("gs:// workdirs need gcsfs (pip install 'jaxsft[gcs]')", allow_module_level=True)
emulator = pytest.importorskip("gcp_storage_emulator.server",
                               reason="no GCS emulator: pip install gcp-storage-emulator")

BUCKET = "jaxsft-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _add_generation_preconditions(server_module) -> None:
    """The emulator ignores ifGenerationMatch / ifGenerationNotMatch and sends no x-goog-generation header;
    TensorStore's GCS driver (Orbax's OCDBT manifests) relies on both."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def current(storage, bucket, name):
        try:
            return storage.get_file_obj(bucket, name)["generation"]
        except NotFound:
            return None

    def failed(request, gen) -> HTTPStatus | None:
        match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
        if match and (match[0] != (gen or "0")):
            return HTTPStatus.PRECONDITION_FAILED
        if not_match and gen is not None and not_match[0] == gen:
            return HTTPStatus.NOT_MODIFIED
        return None

    def download(request, response, storage, *args, _orig=objects.download, **kwargs):
        gen = current(storage, request.params["bucket_name"], request.params["object_id"])
        status = failed(request, gen) if gen is not None else None
        if status is not None:
            response.status = status
            return None
        if gen is not None:
            response["x-goog-generation"] = gen
        return _orig(request, response, storage, *args, **kwargs)

    def insert(request, response, storage, *args, _orig=objects.insert, **kwargs):
        name = (request.query.get("name") or [None])[0]
        if name is not None and request.query.get("ifGenerationMatch"):
            status = failed(request, current(storage, request.params["bucket_name"], name))
            if status is not None:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return _orig(request, response, storage, *args, **kwargs)

    swap = {objects.download: download, objects.insert: insert}
    for _, handlers in server_module.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn in swap:
                handlers[method] = swap[fn]
    objects.insert, objects.download = insert, download


@pytest.fixture(scope="module")
def gcs():
    """The emulator, and the environment that points gcsfs and TensorStore at it (no credentials needed)."""
    _add_generation_preconditions(emulator)
    port = _free_port()
    server = emulator.create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # every 404 probe is logged as an error
    url = f"http://localhost:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _run(args: list[str], env: dict, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=600)


def _objects(prefix: str) -> list[str]:
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.invalidate_cache()
    return sorted(p[len(prefix) + 1:] for p in fs.find(prefix))


@pytest.mark.slow
def test_gs_workdir_trains_resumes_evaluates_and_reports(gcs, tiny_bert, tmp_path):
    from etils import epath

    # The data lives in the bucket too (each process downloads a gs:// data file once).
    train, evals = f"gs://{BUCKET}/data/train.tsv", f"gs://{BUCKET}/data/eval.tsv"
    epath.Path(train).write_bytes(write_tsv(tmp_path / "train.tsv", synthetic_rows(48, 1)).read_bytes())
    epath.Path(evals).write_bytes(write_tsv(tmp_path / "eval.tsv", synthetic_rows(16, 2)).read_bytes())
    workdir = f"gs://{BUCKET}/run1"
    args = ["jaxsft.run", "--config", "configs/classify.py", "--workdir", workdir,
            f"--config.model.name_or_path={tiny_bert}", f"--config.data.train={train}",
            f"--config.data.eval={evals}", "--config.max_length=64", "--config.batch_size=8",
            "--config.learning_rate=1e-3", "--config.log_every_steps=1", "--config.max_steps=6",
            "--config.checkpoint_every_steps=2", "--config.eval_every_steps=2"]

    crashed = _run(args, gcs, {"JAXSFT_FAIL_AFTER_STEP": "4"})
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    assert "injected failure after step 4" in crashed.stderr
    objects = _objects(f"{BUCKET}/run1")
    for name in ("config.json", "environment.json", "hf/config.json", "hf/tokenizer.json", "metrics.jsonl",
                 "checkpoints/4/jaxsft_files.json"):
        assert name in objects, objects
    assert not any(o.startswith(".lock") or ".jaxsft-write-check" in o for o in objects), objects
    assert not os.path.exists(ROOT / "gs:")  # not a local folder called "gs:"

    resumed = _run(args, gcs)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 4" in resumed.stderr, resumed.stderr[-3000:]
    final = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert final["step"] == 6 and "eval_accuracy" in final
    rows = [json.loads(line) for line in epath.Path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps[:4] == [1, 2, 3, 4] and steps[-2:] == [5, 6], steps  # the first run's rows kept, then the rerun's
    objects = _objects(f"{BUCKET}/run1")
    assert any(o.startswith("tensorboard/events.out.tfevents") for o in objects), objects
    assert "checkpoints/6/jaxsft_files.json" in objects and "report.png" in objects, objects

    out = _run(["jaxsft.evaluate", "--workdir", workdir, "--checkpoint", "latest"], gcs)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == 6 and result["eval_accuracy"] == pytest.approx(final["eval_accuracy"])

    report = _run(["jaxsft.report", "--workdir", workdir], gcs)
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"run report for {workdir}" in report.stdout and "best eval_accuracy" in report.stdout, report.stdout


def test_gs_data_files_read_like_local_ones_and_a_missing_one_is_one_line(gcs, tmp_path):
    from etils import epath

    from jaxsft.data.sources import load_source
    from jaxsft.errors import UserError

    rows = synthetic_rows(12, 3)
    local = write_tsv(tmp_path / "train.tsv", rows)
    epath.Path(f"gs://{BUCKET}/d/train.tsv").write_bytes(local.read_bytes())
    assert load_source(f"gs://{BUCKET}/d/train.tsv", "data.train").to_list() == \
        load_source(str(local), "data.train").to_list()
    (tmp_path / "a.en").write_text("one\ntwo\n")
    epath.Path(f"gs://{BUCKET}/d/a.de").write_text("eins\nzwei\n")
    pairs = load_source(f"{tmp_path / 'a.en'},gs://{BUCKET}/d/a.de", "data.train")
    assert pairs.to_list() == [{"source": "one", "target": "eins"}, {"source": "two", "target": "zwei"}]
    with pytest.raises(UserError, match=rf"^data.eval: file not found: gs://{BUCKET}/d/missing.tsv$"):
        load_source(f"gs://{BUCKET}/d/missing.tsv", "data.eval")
    with pytest.raises(UserError, match=r"^data.train: s3://b/x.tsv: s3:// is not supported"):
        load_source("s3://b/x.tsv", "data.train")


def test_gs_lock_object_names_its_holder_warns_a_second_run_and_is_removed(gcs, caplog):
    """No flock on GCS: the lock is an object naming pid and host; a second run warns (it cannot tell a live run
    from a preempted one) instead of refusing; releasing removes it."""
    from jaxsft import fs
    from jaxsft.lock import WorkdirLock

    w = fs.path(f"gs://{BUCKET}/locked")
    first = WorkdirLock(w)
    first.check()
    first.acquire()
    assert f"pid {os.getpid()} on {socket.gethostname()}" in (w / ".lock").read_text()
    with caplog.at_level(logging.WARNING, logger="jaxsft"):
        WorkdirLock(w).check()
    assert "another run may be writing into it" in caplog.text and f"pid {os.getpid()}" in caplog.text
    first.release()
    assert not (w / ".lock").exists()


def test_gs_metrics_and_checkpoint_files_go_through_the_bucket(gcs, tmp_path):
    """The pieces without a model: metrics.jsonl is read back and rewritten whole (no append on GCS), and a
    truncated checkpoint object is caught by its file list and moved aside (copy + delete on GCS)."""
    import jax.numpy as jnp
    from etils import epath

    from jaxsft.checkpoint import Checkpoints, abstract
    from jaxsft.reporting import MetricsWriter

    w = epath.Path(f"gs://{BUCKET}/pieces")
    (w / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # the last row cut by a kill
    writer = MetricsWriter(w / "metrics.jsonl")
    writer.write(3, {"loss": 0.5})
    writer.close()
    lines = (w / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == '{"step": 1, "loss": 1.0}' and json.loads(lines[-1])["step"] == 3, lines

    ckpts = Checkpoints(w / "checkpoints", keep=2)
    for step in (1, 2):
        ckpts.save(step, {"params": {"w": jnp.full((4, 4), float(step))}}, {"step": step})
    ckpts.close()
    files = json.loads((w / "checkpoints" / "2" / "jaxsft_files.json").read_text())["files"]
    victim = max(files, key=files.get)
    (w / "checkpoints" / "2" / victim).write_bytes(b"x")
    ckpts = Checkpoints(w / "checkpoints", keep=2)
    assert "truncated" in ckpts.verify(2)
    state, meta = ckpts.restore_latest(abstract({"params": {"w": jnp.zeros((4, 4))}}))
    assert meta["step"] == 1 and float(state["params"]["w"][0, 0]) == 1.0
    assert ckpts.steps() == [1] and (w / "checkpoints" / "2.damaged" / "jaxsft_files.json").exists()
    ckpts.close()
