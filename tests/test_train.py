"""The training loop: resume, compile counts, device-count invariance, accumulation, and the CLIs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, make_tiny_classifier, synthetic_rows, write_tsv

from jaxsft import config as config_lib
from jaxsft import pipeline
from jaxsft import train as train_lib
from jaxsft.data.batching import BatchPlan, bucket_for, default_buckets


def tiny_config(model, train_file, eval_file=None, **overrides):
    c = config_lib.load_config_file(str(ROOT / "configs" / "classify.py"))
    c.model.name_or_path = str(model)
    c.data.train, c.data.eval = str(train_file), str(eval_file or "")
    c.max_length, c.batch_size, c.learning_rate, c.log_every_steps = 64, 8, 1e-3, 1
    c.num_epochs, c.warmup_ratio = 1, 0.1
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def events(workdir, key):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl") if key in json.loads(line)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_tsv(d / "train.tsv", synthetic_rows(120, 1)), write_tsv(d / "eval.tsv", synthetic_rows(40, 2))


@pytest.mark.slow  # ~37 s (tests/faults/test_kill.py covers kill -9 too)
def test_resume_after_a_crash_ends_like_an_uninterrupted_run(tiny_bert, data, tmp_path, monkeypatch):
    kw = dict(max_steps=11, checkpoint_every_steps=3, eval_every_steps=6)
    full = train_lib.train_and_evaluate(tiny_config(tiny_bert, *data, **kw), tmp_path / "full")
    monkeypatch.setattr(train_lib, "_FAIL_AFTER_STEP", 8)
    with pytest.raises(RuntimeError, match="injected failure after step 8"):
        train_lib.train_and_evaluate(tiny_config(tiny_bert, *data, **kw), tmp_path / "resumed")
    monkeypatch.setattr(train_lib, "_FAIL_AFTER_STEP", -1)
    resumed = train_lib.train_and_evaluate(tiny_config(tiny_bert, *data, **kw), tmp_path / "resumed")
    scores = lambda r: {k: v for k, v in r.items() if k.startswith("eval_") and k != "eval_seconds"}
    assert scores(resumed) == scores(full) and resumed["step"] == full["step"] == 11
    want = {e["step"]: e["loss"] for e in events(tmp_path / "full", "loss")}
    got = {e["step"]: e["loss"] for e in events(tmp_path / "resumed", "loss")}  # later rows win
    assert got.keys() == want.keys() and all(abs(got[s] - want[s]) < 1e-6 for s in want)


@pytest.mark.slow  # ~40 s: runs in the slow tier (CI runs both)
def test_loss_accumulator_survives_resume(tiny_bert, data, tmp_path, monkeypatch):
    # Logging every 4 steps with checkpoints every 3: the mean at step 8 spans the crash at step 6.
    kw = dict(max_steps=8, checkpoint_every_steps=3, eval_every_steps=100, log_every_steps=4)
    train_lib.train_and_evaluate(tiny_config(tiny_bert, *data, **kw), tmp_path / "full")
    monkeypatch.setattr(train_lib, "_FAIL_AFTER_STEP", 6)
    with pytest.raises(RuntimeError):
        train_lib.train_and_evaluate(tiny_config(tiny_bert, *data, **kw), tmp_path / "resumed")
    monkeypatch.setattr(train_lib, "_FAIL_AFTER_STEP", -1)
    train_lib.train_and_evaluate(tiny_config(tiny_bert, *data, **kw), tmp_path / "resumed")
    want, got = events(tmp_path / "full", "loss")[-1], events(tmp_path / "resumed", "loss")[-1]
    assert want["step"] == got["step"] == 8 and abs(want["loss"] - got["loss"]) < 1e-6


def test_an_epoch_of_mixed_lengths_compiles_once_per_bucket_used(tiny_bert, data, tmp_path):
    config = tiny_config(tiny_bert, data[0], None)
    final = train_lib.train_and_evaluate(config, tmp_path / "w")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    lengths = np.asarray([len(x) for x in tok([r.split("\t")[0] for r in data[0].read_text().splitlines()[1:]],
                                              truncation=True, max_length=64)["input_ids"]])
    longest = [int(lengths[b].max()) for b in BatchPlan(lengths, 8, seed=config.seed, shuffle=True).epoch(0)]
    chosen = pipeline.buckets(config, longest)  # data.num_buckets lengths chosen from these batches
    assert len(chosen) <= config.data.num_buckets and chosen != default_buckets(64)
    used = {bucket_for(n, chosen) for n in longest}
    assert len(used) >= 2  # the data really mixes lengths
    assert 1 <= final["train_step_compilations"] <= len(used)


@pytest.mark.slow  # ~35 s (the unequal-token test below checks the same step in the fast tier)
def test_gradient_accumulation_matches_one_big_batch(tiny_bert_no_dropout, data, tmp_path):
    one = train_lib.train_and_evaluate(tiny_config(tiny_bert_no_dropout, *data, max_steps=4), tmp_path / "a")
    acc = train_lib.train_and_evaluate(tiny_config(tiny_bert_no_dropout, *data, max_steps=4,
                                                   gradient_accumulation_steps=2), tmp_path / "b")
    assert abs(one["eval_loss"] - acc["eval_loss"]) < 1e-5
    la, lb = events(tmp_path / "a", "loss"), events(tmp_path / "b", "loss")
    assert all(abs(x["loss"] - y["loss"]) < 1e-5 for x, y in zip(la, lb))


def test_accumulation_is_a_global_token_mean_when_micro_batches_hold_unequal_loss_tokens():
    """Causal LM, k=2: micro-batch 0 (rows 0, 2: strided) holds 3 loss tokens, micro-batch 1 (rows 1, 3) 40. The
    accumulated step must equal one k=1 step over the whole batch (the mean over all 43 tokens), not the mean of
    the two micro-batch means (which weighs 3 tokens like 40). Plain SGD, so the update is the gradient itself."""
    import jax.numpy as jnp
    import optax
    import transformers as tf
    from flax import nnx

    from jaxsft import defaults, parallel
    from jaxsft.models import Functional, build_model, flatten_state

    vocab, seq = 97, 24
    hf_config = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               initializer_range=0.2)
    model = build_model(hf_config, "causal_lm", jnp.float32, 0)
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    functional, tx = Functional(model), optax.sgd(1.0)

    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, (4, seq)).astype(np.int32)
    loss_mask = np.zeros((4, seq), np.int32)
    loss_mask[0, 5:7], loss_mask[2, 10] = 1, 1  # micro-batch 0: 3 loss tokens
    loss_mask[1, 2:22], loss_mask[3, 3:23] = 1, 1  # micro-batch 1: 40 loss tokens
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "segment_ids": np.ones_like(ids),
             "positions": np.tile(np.arange(seq, dtype=np.int32), (4, 1)), "targets": np.roll(ids, -1, axis=1),
             "loss_mask": loss_mask, "weights": loss_mask.sum(1)}

    def step_fn(k):  # as train.py builds it
        c = defaults.base_config()
        c.task, c.batch_size, c.gradient_accumulation_steps, c.max_length, c.mesh.data = "causal_lm", 4, k, seq, 1
        mesh = train_lib.mesh_for(c)
        fn = train_lib.make_train_step(functional, pipeline.task_module(c), tx, c, mesh)

        def run(rows_with_loss):
            b = {**batch, "loss_mask": loss_mask * np.isin(np.arange(4), rows_with_loss)[:, None]}
            b["weights"] = b["loss_mask"].sum(1)
            p = {n: jnp.array(v) for n, v in params.items()}  # fresh copies: the step donates its state
            new, m = fn(pipeline.train_state(p, {}, tx.init(p)), parallel.to_global(b, mesh), np.int32(0))
            flat = np.concatenate([np.asarray(new["params"][n]).ravel() for n in sorted(params)])
            return flat, float(m["loss_sum"]), float(m["count"])

        return run

    acc, acc_loss, acc_count = step_fn(2)([0, 1, 2, 3])
    one_step = step_fn(1)
    one, one_loss, one_count = one_step([0, 1, 2, 3])
    # Each micro-batch's own mean: the k=1 step with the other micro-batch's rows carrying no loss tokens.
    micro = [one_step(rows) for rows in ([0, 2], [1, 3])]
    assert acc_count == one_count == 43 and [m[2] for m in micro] == [3, 40]
    assert abs(acc_loss - one_loss) <= 1e-5 * abs(one_loss)
    mean_of_means = (micro[0][0] + micro[1][0]) / 2  # SGD: the params after a step on the mean of the two means

    p0 = np.concatenate([np.asarray(params[n]).ravel() for n in sorted(params)])
    scale = np.abs(p0).max()
    np.testing.assert_allclose(acc, one, rtol=1e-6, atol=1e-6 * scale)  # the params after the step
    update = np.linalg.norm(one - p0)
    assert update > 1e-2 * np.linalg.norm(p0)  # the step moved the weights well beyond float32 rounding
    assert np.linalg.norm(acc - one) < 1e-4 * update  # the update itself equals the whole batch's
    # The mean of per-micro-batch means is a different update, far outside those tolerances.
    assert np.linalg.norm(mean_of_means - one) > 0.1 * update
    assert not np.allclose(mean_of_means, one, rtol=1e-6, atol=1e-6 * scale)


def test_bfloat16_compute_trains_with_float32_master_weights(tiny_bert, data, tmp_path):
    final = train_lib.train_and_evaluate(tiny_config(tiny_bert, *data, max_steps=3, dtype="bfloat16"),
                                         tmp_path / "w")
    assert np.isfinite(final["eval_loss"])
    import orbax.checkpoint as ocp

    from jaxsft.checkpoint import Checkpoints

    ck = Checkpoints(tmp_path / "w" / "checkpoints", read_only=True)
    saved = ck.manager.restore(ck.steps()[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert {str(v.dtype) for v in saved["state"]["params"].values()} == {"float32"}


def run_cli(module, *args, env_extra=None, check=True):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def cli_args(model, train, evals, workdir, *extra):
    return ["--config", "configs/classify.py", "--workdir", workdir, f"--config.model.name_or_path={model}",
            f"--config.data.train={train}", f"--config.data.eval={evals}", "--config.max_length=64",
            "--config.learning_rate=1e-3", "--config.log_every_steps=1", *extra]


@pytest.mark.slow  # ~65 s
def test_one_and_eight_devices_train_to_the_same_loss(tiny_bert, data, tmp_path):
    losses = {}
    for n in (1, 8):
        run_cli("jaxsft.run", *cli_args(tiny_bert, *data, tmp_path / f"d{n}", "--config.max_steps=6",
                                        "--config.batch_size=16"),
                env_extra={"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
        env = json.loads((tmp_path / f"d{n}" / "environment.json").read_text())
        assert len(env["devices"]) == n
        losses[n] = [e["loss"] for e in events(tmp_path / f"d{n}", "loss")]
    assert len(losses[1]) == 6
    np.testing.assert_allclose(losses[8], losses[1], atol=1e-5, rtol=0)


def test_evaluate_reproduces_training_eval_and_export_agrees_with_transformers(tiny_bert, data, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    w = tmp_path / "w"
    run_cli("jaxsft.run", *cli_args(tiny_bert, *data, w, "--config.num_epochs=2", "--config.batch_size=8",
                                    "--config.lr_scheduler_type=cosine", "--config.warmup_steps=2"))
    assert {p.name for p in w.iterdir()} >= {"config.json", "hf", "checkpoints", "metrics.jsonl"}
    train_ev, eval_ev = events(w, "loss"), events(w, "eval_accuracy")
    assert all({"learning_rate", "grad_norm", "examples_per_second"} <= e.keys() for e in train_ev)
    # step s trained at transformers' cosine schedule (2 warmup steps) of step s - 1, as HF Trainer's would
    from transformers.optimization import _get_cosine_schedule_with_warmup_lr_lambda as hf_cosine
    total = train_ev[-1]["step"]
    want = [1e-3 * hf_cosine(e["step"] - 1, num_warmup_steps=2, num_training_steps=total, num_cycles=0.5)
            for e in train_ev]
    np.testing.assert_allclose([e["learning_rate"] for e in train_ev], want, rtol=1e-6, atol=1e-10)
    assert all({"eval_loss", "eval_f1", "eval_mcc"} <= e.keys() for e in eval_ev)
    best = max(eval_ev, key=lambda e: (e["eval_accuracy"], e["step"]))
    proc = run_cli("jaxsft.evaluate", "--workdir", w, "--predictions", tmp_path / "pred.jsonl")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == best["step"]
    for k in ("eval_loss", "eval_accuracy", "eval_f1", "eval_mcc"):
        assert result[k] == best[k], k  # exactly equal, not approximately
    preds = [json.loads(line) for line in open(tmp_path / "pred.jsonl")]
    assert len(preds) == 40 and {"index", "label", "pred_id", "pred_label", "probabilities"} <= preds[0].keys()

    run_cli("jaxsft.export", "--workdir", w, "--output", tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert model.config.id2label == {0: "negative", 1: "positive"}
    texts = [line.split("\t")[0] for line in data[1].read_text().splitlines()[1:]]
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits
    probs = torch.softmax(logits, -1).numpy()
    np.testing.assert_allclose(probs, [p["probabilities"] for p in preds], atol=1e-4)
    assert [p["pred_id"] for p in preds] == probs.argmax(-1).tolist()

    # An unlabelled file is predicted, not scored.
    write_tsv(tmp_path / "nolabel.tsv", [(t,) for t in texts[:5]], header=("sentence",))
    proc = run_cli("jaxsft.evaluate", "--workdir", w, "--config.data.eval", tmp_path / "nolabel.tsv",
                   "--predictions", tmp_path / "p2.jsonl")
    assert "eval_accuracy" not in json.loads(proc.stdout.strip().splitlines()[-1])
    assert [json.loads(line)["pred_id"] for line in open(tmp_path / "p2.jsonl")] == probs.argmax(-1)[:5].tolist()

    # An HF folder evaluates directly, with the same numbers as the workdir's checkpoint.
    proc = run_cli("jaxsft.evaluate", "--model", tmp_path / "hf", "--config.data.eval", data[1],
                   "--config.max_length=64")
    hf_result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(hf_result["eval_accuracy"] - result["eval_accuracy"]) < 1e-9
    assert abs(hf_result["eval_loss"] - result["eval_loss"]) < 1e-5


def test_quick_start_command_gives_the_accuracy_the_readme_states(tmp_path):
    """The README's Quick start command, as written there (its workdir moved to tmp), reaches the eval accuracy
    the README states, within 0.01: the two cannot drift apart."""
    import re
    import shlex

    from conftest import minilm_path

    minilm_path()
    quick = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    stated = float(re.search(r"(0\.\d+) eval accuracy", quick).group(1))
    command = shlex.split(re.search(r"python -m jaxsft\.run [^\n`]*", quick).group(0))
    args = command[3:]
    args[args.index("--workdir") + 1] = str(tmp_path / "w")
    proc = run_cli(command[2], *args)
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(final["eval_accuracy"] - stated) <= 0.01, (final, stated)
    assert final["eval_accuracy"] >= 0.80, final


@pytest.mark.slow  # three CLI runs + an export: ~60 s idle
def test_regression_trains_evaluates_and_exports_to_transformers(tmp_path):
    """model.num_labels=1 (README: MSE, Pearson/Spearman) end to end through the CLIs: run → evaluate →
    export → transformers loads a regression head whose outputs equal jaxsft's predictions."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tiny_bert = make_tiny_classifier(tmp_path / "ckpt", num_labels=1)
    rows = [(t, f"{(1.0 if lab == 'positive' else -1.0) + 0.1 * (i % 3):.2f}")
            for i, (t, lab) in enumerate(synthetic_rows(72, seed=3))]
    train, evals = write_tsv(tmp_path / "tr.tsv", rows[:56]), write_tsv(tmp_path / "ev.tsv", rows[56:])
    w = tmp_path / "w"
    run_cli("jaxsft.run", *cli_args(tiny_bert, train, evals, w, "--config.model.num_labels=1", "--config.max_steps=6",
                                    "--config.batch_size=8"))
    assert json.loads((w / "config.json").read_text())["data"]["label_names"] is None
    ev = events(w, "eval_pearson")
    assert ev and all({"eval_loss", "eval_spearman"} <= e.keys() for e in ev)
    proc = run_cli("jaxsft.evaluate", "--workdir", w, "--predictions", tmp_path / "pred.jsonl")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"eval_loss", "eval_pearson", "eval_spearman"} <= result.keys()
    preds = [json.loads(line)["prediction"] for line in open(tmp_path / "pred.jsonl")]
    assert len(preds) == 16

    run_cli("jaxsft.export", "--workdir", w, "--output", tmp_path / "hf")
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes  # safetensors alone used to be 0600
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        out = model(**tok([r[0] for r in rows[56:]], padding=True, truncation=True, max_length=64,
                          return_tensors="pt")).logits[:, 0].numpy()
    np.testing.assert_allclose(out, preds, atol=1e-4)
