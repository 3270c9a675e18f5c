"""data.streaming: the training source read as a datasets.IterableDataset, tokenized and batched as it comes. A
stream resumed at any batch goes on with the same batches; each process reads its own share; a streamed run trains
exactly as the in-memory run on the same batches (classification; causal_lm unpacked and packed); a run killed and
rerun goes on with the same losses; and the CLI runs it end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, alpaca_rows, llm_tokenizer, make_tiny_decoder, minilm_path, synthetic_rows, write_jsonl

from jaxsft import config as config_lib
from jaxsft import train as train_lib
from jaxsft.data import streaming
from jaxsft.data.batching import BatchPlan
from jaxsft.data.sources import load_mixture, load_source
from jaxsft.defaults import base_config
from jaxsft.errors import UserError
from jaxsft.tasks import causal_lm, classification

LABELS = ["negative", "positive"]


def classify_rows(n: int, seed: int = 1) -> list[dict]:
    return [{"sentence": t, "label": y} for t, y in synthetic_rows(n, seed)]


def causal_config(**data):
    c = base_config()
    c.task, c.max_length = "causal_lm", 96
    c.data.update(data)
    return c


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_streaming_without_max_steps_is_refused_in_one_line():
    c = base_config()
    c.data.streaming = True
    with pytest.raises(UserError, match=r"^config\.data\.streaming=True needs config\.max_steps > 0: a stream has no "
                                        r"length, so num_epochs \(1\) cannot count the steps$"):
        config_lib.check_values(c)
    c.max_steps, c.data.eval_fraction = 10, 0.1
    with pytest.raises(UserError, match=r"^config\.data\.eval_fraction=0\.1 .* with data\.streaming=True set "
                                        r"data\.eval instead \(or data\.eval_fraction=0\)$"):
        config_lib.check_values(c)
    c.data.eval_fraction = 0.0
    config_lib.check_values(c)


def test_sources_read_whole_are_refused_as_streams(tmp_path):
    with pytest.raises(UserError, match=r"^data\.train: tfds:mnist: data\.streaming reads data files"):
        load_source("tfds:mnist", "data.train", streaming=True)
    with pytest.raises(UserError, match=r"line-aligned text pairs are read whole \(set data\.streaming=False\)$"):
        load_source(f"{tmp_path}/a.en,{tmp_path}/a.de", "data.train", streaming=True)


def test_classification_stream_needs_label_names(tmp_path):
    from transformers import AutoTokenizer

    p = write_jsonl(tmp_path / "t.jsonl", classify_rows(10))
    c = base_config()
    with pytest.raises(UserError, match=r"^data\.streaming=True: classification needs config\.data\.label_names"):
        streaming.TrainStream(classification, load_source(str(p), "data.train", streaming=True),
                              AutoTokenizer.from_pretrained(minilm_path()), c, str(p), batch_size=4)


@pytest.mark.parametrize("case", ["causal_lm_packed", "classification_grouped"])
def test_a_stream_resumed_at_any_batch_goes_on_with_the_same_batches(case, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(streaming, "CHUNK", 7)  # many chunks: batches that span two of them
    if case == "causal_lm_packed":
        p = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30, 1))
        c, task, tok = causal_config(shuffle_buffer_size=8), causal_lm, llm_tokenizer()
    else:
        p = write_jsonl(tmp_path / "c.jsonl", classify_rows(30))
        c, task, tok = base_config(), classification, AutoTokenizer.from_pretrained(minilm_path())
        c.max_length, c.data.label_names, c.data.shuffle_buffer_size = 48, LABELS, 8
    stream = streaming.TrainStream(task, load_source(str(p), "data.train", streaming=True), tok, c, str(p),
                                   batch_size=4)
    it = stream.batches()
    want = [next(it) for _ in range(20)]  # several epochs
    ends = [i for i, (*_, end, _) in enumerate(want) if end]
    assert len(ends) >= 2 and want[ends[0]][4] == {"epoch": 1, "example": 0, "row": 0, "batch": 0}
    first, second = (sum(n for _, n, *_ in want[a:b]) for a, b in ((0, ends[0] + 1), (ends[0] + 1, ends[1] + 1)))
    if task is classification:
        assert first == second == 30  # every example once an epoch
    starts = [[w[0]["input_ids"].tobytes() for w in want[a:a + 3]] for a in (0, ends[0] + 1)]
    assert starts[0] != starts[1]  # another shuffle each epoch
    for k in range(len(want) - 1):
        again = stream.batches(json.loads(json.dumps(want[k][4])))  # as the checkpoint's JSON stores it
        for j in range(k + 1, min(k + 6, len(want))):
            arrays, n, tokens, end, position = next(again)
            assert (n, tokens, end, position) == want[j][1:], (k, j)
            for name, value in arrays.items():
                np.testing.assert_array_equal(value, want[j][0][name], err_msg=f"{k} {j} {name}")


def test_each_process_reads_its_own_share_of_the_stream(tmp_path):
    from transformers import AutoTokenizer

    rows = classify_rows(23)
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    c = base_config()
    c.max_length, c.data.label_names = 48, LABELS
    tok = AutoTokenizer.from_pretrained(minilm_path())
    seen = []
    for index in range(3):
        s = streaming.TrainStream(classification, load_source(str(p), "data.train", streaming=True), tok, c,
                                  str(p), batch_size=2, index=index, count=3)
        assert s.buckets == [48]  # several processes: one padded length, no talking
        share = [r["sentence"] for r in s.epoch_stream(0)]
        counted = 0
        for arrays, n, *_, end, _ in s.batches():
            assert arrays["input_ids"].shape == (2, 48)
            counted += n
            if end:
                break
        assert counted == len(share)
        seen += share
    assert sorted(seen) == sorted(r["sentence"] for r in rows)  # together every example, each once


def test_a_streamed_mixture_is_interleaved_from_streams(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(10)])
    mixed = load_mixture([str(a), str(b)], [3, 1], "first_exhausted", 0, streaming=True)
    got = [r["prompt"] for r in mixed]
    assert got == [r["prompt"] for r in load_mixture([str(a), str(b)], [3, 1], "first_exhausted", 0, streaming=True)]
    assert [p for p in got if p.startswith("b")] == [f"b{i}" for i in range(10)]


def in_file_order(rows: list[dict], batch_size: int, seed: int) -> list[dict]:
    """The rows in the order the in-memory run (data.group_by_length=False) draws them in epoch 0."""
    perm = BatchPlan(np.ones(len(rows)), batch_size, seed=seed, shuffle=True, group_by_length=False).epoch(0)
    return [rows[i] for i in np.concatenate(perm)]


def classify_config(model, train, **over):
    c = config_lib.load_config_file(str(ROOT / "configs" / "classify.py"))
    c.model.name_or_path, c.data.train, c.data.eval = str(model), str(train), ""
    c.max_length, c.batch_size, c.learning_rate, c.log_every_steps, c.warmup_steps = 64, 8, 1e-3, 1, 0
    c.data.label_names, c.data.group_by_length, c.data.buckets, c.data.shuffle_buffer_size = LABELS, False, [32, 64], 0
    c.update(over)
    return c


def sft_config(model, train, **over):
    c = config_lib.load_config_file(str(ROOT / "configs" / "sft.py"))
    c.model.name_or_path, c.data.train, c.data.eval = str(model), str(train), ""
    c.max_length, c.batch_size, c.learning_rate, c.log_every_steps, c.warmup_steps = 128, 4, 1e-2, 1, 0
    c.dtype, c.data.group_by_length, c.data.buckets, c.data.shuffle_buffer_size = "float32", False, [64, 128], 0
    c.data.eval_fraction = 0.0
    data = over.pop("data", {})
    c.update(over)
    c.data.update(data)
    return c


@pytest.mark.slow  # ~60 s: six short runs
def test_a_streamed_run_trains_exactly_as_the_in_memory_run_on_the_same_batches(tiny_bert, tmp_path):
    rows = classify_rows(40)
    memory = write_jsonl(tmp_path / "memory.jsonl", rows)
    stream = write_jsonl(tmp_path / "stream.jsonl", in_file_order(rows, 8, 42))  # the stream's order = the plan's
    kw = dict(max_steps=5, seed=42)
    train_lib.train_and_evaluate(classify_config(tiny_bert, memory, **kw), tmp_path / "m")
    c = classify_config(tiny_bert, stream, **kw)
    c.data.streaming = True
    train_lib.train_and_evaluate(c, tmp_path / "s")
    want, got = losses(tmp_path / "m"), losses(tmp_path / "s")
    assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5]
    assert got == pytest.approx(want, rel=1e-6)

    model = make_tiny_decoder(tmp_path / "llama")
    rows = alpaca_rows(24, 3)
    memory = write_jsonl(tmp_path / "m.jsonl", rows)
    stream = write_jsonl(tmp_path / "s.jsonl", in_file_order(rows, 4, 42))
    kw = dict(max_steps=4, seed=42, data={"packing": False})  # unpacked: one example a row
    train_lib.train_and_evaluate(sft_config(model, memory, **kw), tmp_path / "cm")
    train_lib.train_and_evaluate(sft_config(model, stream, **{**kw, "data": {"packing": False, "streaming": True}}),
                                 tmp_path / "cs")
    want, got = losses(tmp_path / "cm"), losses(tmp_path / "cs")
    assert sorted(want) == sorted(got) == [1, 2, 3, 4] and got == pytest.approx(want, rel=1e-6)
    # packed: every row in one batch an epoch, so both runs train on the same rows each step (in another order)
    kw = dict(max_steps=2, batch_size=16, data={"packing": True})
    train_lib.train_and_evaluate(sft_config(model, memory, **kw), tmp_path / "pm")
    train_lib.train_and_evaluate(sft_config(model, memory, **{**kw, "data": {"packing": True, "streaming": True}}),
                                 tmp_path / "ps")
    want, got = losses(tmp_path / "pm"), losses(tmp_path / "ps")
    assert sorted(want) == sorted(got) == [1, 2] and got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow  # ~30 s: three short runs
def test_a_streamed_mixture_resumes_exactly_after_a_crash(tmp_path, monkeypatch):
    model = make_tiny_decoder(tmp_path / "llama")
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20, 1))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(12, 2))

    def config():
        c = sft_config(model, "", max_steps=9, checkpoint_every_steps=2, data={"streaming": True,
                                                                             "shuffle_buffer_size": 16})
        c.data.mixture, c.data.mixture_weights = [str(a), str(b)], [0.6, 0.4]
        return c

    monkeypatch.setattr(streaming, "CHUNK", 5)  # chunk boundaries inside batches, epochs inside the run
    train_lib.train_and_evaluate(config(), tmp_path / "whole")
    monkeypatch.setattr(train_lib, "_FAIL_AFTER_STEP", 5)
    with pytest.raises(RuntimeError, match="injected failure after step 5"):
        train_lib.train_and_evaluate(config(), tmp_path / "cut")
    monkeypatch.setattr(train_lib, "_FAIL_AFTER_STEP", -1)
    train_lib.train_and_evaluate(config(), tmp_path / "cut")
    want, got = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(want) == sorted(got) == list(range(1, 10))
    logged = [json.loads(line).get("step") for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert logged == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9]  # the rerun went on from the checkpoint of step 4
    assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want)


def _run(args, env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "jaxsft.run", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env)


def _committed(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(c.name) for c in d.iterdir() if c.name.isdigit()) if d.is_dir() else []


@pytest.mark.slow  # ~60 s: three CLI runs
def test_cli_streamed_run_killed_with_sigkill_resumes_with_the_same_losses(tmp_path):
    model = make_tiny_decoder(tmp_path / "m")
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(40, 1))
    common = ["--config", "configs/sft.py", f"--config.model.name_or_path={model}", f"--config.data.train={data}",
              "--config.data.streaming=true", "--config.max_length=128", "--config.batch_size=4",
              "--config.log_every_steps=1", "--config.dtype=float32", "--config.data.eval_fraction=0"]
    p = _run([*common, "--config.num_epochs=2", "--workdir", tmp_path / "refused"])
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].endswith(
        "config.data.streaming=True needs config.max_steps > 0: a stream has no length, so num_epochs (2) cannot "
        "count the steps"), p.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
    common += ["--config.max_steps=24", "--config.checkpoint_every_steps=1"]  # 10 batches an epoch: 3 epochs
    p = _run([*common, "--workdir", tmp_path / "whole"])
    assert p.returncode == 0, p.stderr[-3000:]
    want = losses(tmp_path / "whole")
    assert sorted(want) == list(range(1, 25))

    cut = tmp_path / "cut"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxsft.run", *map(str, common), "--workdir", str(cut)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(s >= 6 for s in _committed(cut)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last = max(_committed(cut))
    assert 6 <= last < 24, "the run ended before the kill"
    p = _run([*common, "--workdir", cut])
    assert p.returncode == 0 and f"resuming from step {last} " in p.stderr, p.stderr[-3000:]
    got = losses(cut)  # later rows win: the rerun's
    assert sorted(got) == list(range(1, 25))
    assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want)


def test_a_bad_line_met_in_the_stream_is_one_line_naming_it(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(3, 1)) + '{"instruction": "x", "output\n')
    with pytest.raises(UserError, match=r"^data\.train: .*bad\.jsonl line 4: invalid JSON"):
        streaming.TrainStream(causal_lm, load_source(str(p), "data.train", streaming=True), llm_tokenizer(),
                              causal_config(), str(p), batch_size=2)
