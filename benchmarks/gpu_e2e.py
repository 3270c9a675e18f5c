"""Every task's CLIs end to end on the accelerator in half precision: the paths cuDNN's attention takes on a GPU
(BERT/RoBERTa's key-padding mask, Marian's and T5's masks and T5's relative bias, cross-attention, packed SFT rows,
left-padded decoding), run for real rather than lowered.

COMMAND (GPU, in benchmarks/gpu_check.sh):  python3 benchmarks/gpu_e2e.py --tokenizer .peer/tokenizer
COMMAND (CPU smoke test):                   python benchmarks/gpu_e2e.py --tokenizer MINILM_DIR --jobs bert

Per job (tiny random checkpoints made here with transformers + torch, the tests' builders; the jobs run side by
side, each a chain of CLI processes):
  bert, roberta   jaxsft.run configs/classify.py in --config.dtype=bfloat16 with evaluation (precompiled before the
                  first step: the path that died at start before the fix), then jaxsft.evaluate of the checkpoint in
                  bfloat16, float16 and float32
  marian, t5      jaxsft.run configs/translate.py in bfloat16, evaluation with beam search decoding in bfloat16
                  (decode.dtype), then jaxsft.evaluate in bfloat16, float16 and float32
  llama           jaxsft.run configs/sft.py (packed rows, bfloat16), then jaxsft.evaluate in bfloat16 / float32 and
                  jaxsft.generate of 4 prompts of different lengths (left-padded) decoding in bfloat16 and float32
Each evaluation's eval_loss in half precision is compared with float32's (the XLA path): |difference| within
--tolerance (default 0.05 nats: the half-precision rounding of tiny random models, not a kernel's error).
Prints one table, then the end of each failed step's output; exits 1 when a step failed or a loss is off, 0 otherwise.
--json FILE keeps the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

JOBS = ("bert", "roberta", "marian", "t5", "llama")
HALF = ("bfloat16", "float16")


def make_job(kind: str, folder: Path, tokenizer: str) -> list[tuple[str, list[str]]]:
    """Checkpoint and data for one job; returns its steps as (name, CLI argv)."""
    from tests import conftest as c

    c.minilm_path = lambda: tokenizer  # the tests' builders, with the tokenizer that travelled
    model, w = folder / "model", folder / "w"
    steps: list[tuple[str, list[str]]] = []
    if kind in ("bert", "roberta"):
        c.make_tiny_classifier(model, kind=kind, num_labels=2, dropout=0.1)
        rows = c.synthetic_rows(160, seed=1)
        train, ev = c.write_tsv(folder / "train.tsv", rows[:128]), c.write_tsv(folder / "eval.tsv", rows[128:])
        steps.append(("run", ["jaxsft.run", "--config", "configs/classify.py", "--workdir", str(w),
                              f"--config.model.name_or_path={model}", f"--config.data.train={train}",
                              f"--config.data.eval={ev}", "--config.dtype=bfloat16", "--config.max_steps=16",
                              "--config.eval_every_steps=8", "--config.batch_size=16", "--config.log_every_steps=8"]))
        for dt in (*HALF, "float32"):
            steps.append((f"evaluate {dt}", ["jaxsft.evaluate", "--workdir", str(w), f"--config.dtype={dt}"]))
    elif kind in ("marian", "t5"):
        c.make_tiny_seq2seq(model, kind=kind)
        rows = c.parallel_rows(160, seed=1)
        train, ev = c.write_parallel(folder, "train", rows[:128]), c.write_parallel(folder, "eval", rows[128:])
        steps.append(("run", ["jaxsft.run", "--config", "configs/translate.py", "--workdir", str(w),
                              f"--config.model.name_or_path={model}", f"--config.data.train={train}",
                              f"--config.data.eval={ev}", "--config.dtype=bfloat16", "--config.max_steps=16",
                              "--config.eval_every_steps=8", "--config.batch_size=16", "--config.log_every_steps=8",
                              "--config.decode.num_beams=2", "--config.decode.max_new_tokens=12",
                              "--config.decode.dtype=bfloat16"]))
        for dt in (*HALF, "float32"):
            steps.append((f"evaluate {dt}", ["jaxsft.evaluate", "--workdir", str(w), f"--config.dtype={dt}"]))
    elif kind == "llama":
        c.make_tiny_decoder(model, kind="llama")
        rows = c.alpaca_rows(160, seed=1)
        train, ev = c.write_jsonl(folder / "train.jsonl", rows[:128]), c.write_jsonl(folder / "eval.jsonl", rows[128:])
        steps.append(("run", ["jaxsft.run", "--config", "configs/sft.py", "--workdir", str(w),
                              f"--config.model.name_or_path={model}", f"--config.data.train={train}",
                              f"--config.data.eval={ev}", "--config.max_steps=16", "--config.eval_every_steps=8",
                              "--config.batch_size=4", "--config.max_length=256", "--config.log_every_steps=8"]))
        for dt in ("bfloat16", "float32"):
            steps.append((f"evaluate {dt}", ["jaxsft.evaluate", "--workdir", str(w), f"--config.dtype={dt}"]))
        prompts = ["red", "Reverse the words red green blue", "Repeat the word twice apple good great fine dull",
                   "Count to three"]
        for dt in ("bfloat16", "float32"):
            steps.append((f"generate {dt}", ["jaxsft.generate", "--workdir", str(w), "--max_new_tokens", "8",
                                             *[a for p in prompts for a in ("--prompt", p)],
                                             f"--config.decode.dtype={dt}"]))
    else:
        raise SystemExit(f"unknown job {kind!r}: one of {', '.join(JOBS)}")
    return steps


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict):
            return d
    return None


def run_chain(kind: str, steps, env, results: list, logs: dict, timeout: float, deadline: float) -> None:
    for name, argv in steps:
        t = time.perf_counter()
        if deadline - t < 10:
            results.append({"job": kind, "step": name, "rc": 124, "seconds": 0.0, "error": "skipped: --budget spent"})
            continue
        try:
            p = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                               timeout=min(timeout, deadline - t))
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = 124, e.stdout or "", (e.stderr or "") if isinstance(e.stderr, str) else ""
        row = {"job": kind, "step": name, "rc": rc, "seconds": round(time.perf_counter() - t, 1)}
        if rc == 0 and name.startswith("evaluate"):
            d = last_json(out) or {}
            row["eval_loss"] = d.get("eval_loss")
            row["metric"] = {k: v for k, v in d.items() if k in ("eval_accuracy", "eval_bleu", "eval_perplexity")}
        if rc == 0 and name.startswith("generate"):
            row["completions"] = [json.loads(ln).get("completion") for ln in out.splitlines() if ln.startswith("{")]
        if rc == 0 and name == "run":
            err_lines = [ln for ln in err.splitlines() if "XLA instead of cuDNN" in ln]
            row["fallbacks"] = sorted(set(ln.split("attention: ", 1)[-1] for ln in err_lines))
        if rc != 0:
            row["error"] = (err.strip().splitlines() or [out.strip()[-300:]])[-1][:300]
            logs[f"{kind}_{name.replace(' ', '_')}.log"] = out[-20000:] + "\n--- stderr\n" + err[-40000:]
        results.append(row)
        if rc != 0 and name == "run":
            return  # nothing to evaluate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a folder with MiniLM's tokenizer files")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--step-timeout", type=float, default=100)
    ap.add_argument("--budget", type=float, default=600, help="seconds for everything; later steps are skipped")
    args = ap.parse_args(argv)
    jobs = [j for j in args.jobs.split(",") if j]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    results: list[dict] = []
    logs: dict[str, str] = {}
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    with tempfile.TemporaryDirectory() as tmp:
        threads = []
        for kind in jobs:
            folder = Path(tmp) / kind
            folder.mkdir()
            steps = make_job(kind, folder, args.tokenizer)
            th = threading.Thread(target=run_chain, args=(kind, steps, env, results, logs, args.step_timeout,
                                                                          deadline))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
    bad = 0
    ref = {r["job"]: r["eval_loss"] for r in results if r["step"] == "evaluate float32" and r.get("eval_loss")}
    print(f"{'job':<8} {'step':<18} {'exit':>4} {'s':>6}  result")
    for r in sorted(results, key=lambda r: (jobs.index(r["job"]), r["step"] != "run", r["step"])):
        note = ""
        if r["rc"] != 0:
            bad += 1
            note = f"FAILED: {r.get('error')}"
        elif "eval_loss" in r:
            loss, f32 = r["eval_loss"], ref.get(r["job"])
            diff = None if (loss is None or f32 is None) else abs(loss - f32)
            r["diff_vs_float32"] = diff
            off = diff is None or diff > args.tolerance
            bad += bool(off)
            note = (f"eval_loss {loss:.4f}" if loss is not None else "no eval_loss") + \
                (f"  |d| vs float32 {diff:.4f}{'  OFF' if off else ''}" if diff is not None else "") + \
                "".join(f"  {k} {v:.4f}" for k, v in r["metric"].items() if isinstance(v, (int, float)))
        elif "completions" in r:
            note = " | ".join(repr(c) for c in r["completions"])[:150]
        elif r["step"] == "run":
            note = "trained + evaluated" + (f"; fallbacks: {r['fallbacks']}" if r.get("fallbacks") else "")
        print(f"{r['job']:<8} {r['step']:<18} {r['rc']:>4} {r['seconds']:>6.1f}  {note}")
    print(f"{len(results)} steps in {time.perf_counter() - t0:.0f} s; {bad} failed or off")
    for name, text in sorted(logs.items()):  # the failures' output, after the table (the device tool returns few files)
        print(f"=== {name} (last 4000 characters)\n{text[-4000:]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
