"""Training throughput of jaxsft's real train step (train.make_train_step, as `jaxsft.run` builds it) at real model
shapes with random weights, beside the peer figures of ../shared/perf when asked.

COMMAND (GPU, full table):  python benchmarks/throughput.py --json throughput.json [--peers .peer]
COMMAND (CPU smoke test):   python benchmarks/throughput.py --tiny

Cases (--cases, comma-separated; default all):
  llama         Llama-3.2-1B shape (16 layers, hidden 2048, GQA 32/8, intermediate 8192, vocab 128256, tied),
                causal_lm SFT, batch 8 x 2048 tokens, fp32 master weights, bf16 compute, AdamW, the first quarter
                of every row is prompt (no loss); jaxsft's default model settings
  llama_tuned   the same with model.scan_layers, model.remat=dots and chunked_loss_size=4096
  llama_packed  the llama_tuned settings on the real SFT lengths (../shared/perf/alpaca_demo_lengths.json,
                [prompt, completion] token counts; random token ids of those lengths) packed into 8 x 2048 rows;
                tokens/s counts useful (non-padding) tokens
  bert32        BERT-base sequence classification (2 labels), seq 128, batch 32, bf16 compute, AdamW (sequences/s)
  bert256       the same at batch 256
--tiny shrinks every model and batch so the whole table runs on a CPU in about a minute; --small is a CPU profiling
size (Llama 4 layers x 256 hidden, vocab 32000, 4 x 512 tokens; BERT 4 x 256). `--set KEY=VALUE` (repeatable)
overrides a config key in every case (e.g. --set model.remat=full). `--memory-analysis` adds XLA's count of the
compiled step's temporary buffers (memory_analysis().temp_size_in_bytes; also on CPU) at the cost of a compile.

Columns: throughput (tokens/s or sequences/s), TFLOP/s (per token 6 x matmul parameters + causal attention
6·L·heads·head_dim·seq, as ../shared/perf/README.md counts; packed rows count each segment's own length; BERT:
6 x matmul parameters + 12·L·hidden·seq), % of a bf16 matmul ceiling measured here (an 8192³ matmul; 512³ with
--tiny), step time, compile time (time to the first step's result less one steady-state step; with
--memory-analysis also `aot_compile_s`, a separate lower().compile() timed on its own), peak device memory
(device.memory_stats()["peak_bytes_in_use"], where the backend reports it: not on CPU).
Each case runs in its own process (peak memory is then the case's own; --no-isolate runs them in this one; --tiny
runs them in this one unless --isolate).
`--peers DIR` runs the peer scripts of DIR (gpu_baseline.py, jax_llama_ref.py, hf_padded_sft.py; --peer-scripts
picks) in separate processes after the cases and prints their figures beside ours with the ratio ours / peer;
`--peer-results DIR` reads the JSON files such a run wrote earlier instead (benchmarks/gpu_check.sh runs the peer
first). `--budget SECONDS` bounds the whole run: cases that no longer fit are reported as skipped, the table printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The real SFT lengths: ../shared/perf, or a copy of that folder in .peer (what travels to a device machine).
LENGTHS_AT = (ROOT.parent / "shared" / "perf" / "alpaca_demo_lengths.json", ROOT / ".peer" / "alpaca_demo_lengths.json")
LENGTHS = next((p for p in LENGTHS_AT if p.is_file()), LENGTHS_AT[0])

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True,
                rope_theta=500000.0, rms_norm_eps=1e-5)
LLAMA_TINY = dict(LLAMA_1B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1000)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522, max_position_embeddings=512)
BERT_TINY = dict(BERT_BASE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TUNED = {"model.scan_layers": True, "model.remat": "dots", "chunked_loss_size": 4096}
PROFILE_STEPS = 5

# case → (kind, settings); shapes are picked by `shapes()`.
CASES = {
    "llama": ("llama", {}),
    "llama_tuned": ("llama", TUNED),
    "llama_packed": ("llama_packed", TUNED),
    "bert32": ("bert", {}),
    "bert256": ("bert", {}),
}

# Peer figures beside each case: (script, its JSON file, key, field, label).
PEERS = {
    "gpu_baseline": "baseline.json",
    "jax_llama_ref": "jax_ref.json",
    "hf_padded_sft": "hf_padded_sft.json",
}
PEER_MAP = {
    "llama": [("gpu_baseline", "torch_llama1b_sft_eager", "tokens_per_s", "HF+PyTorch eager"),
              ("gpu_baseline", "torch_llama1b_sft_compiled", "tokens_per_s", "HF+torch.compile"),
              ("jax_llama_ref", "jax_llama1b_cudnn_remat0", "tokens_per_s", "JAX ref (scan, cuDNN)"),
              ("jax_llama_ref", "jax_llama1b_cudnn_remat1", "tokens_per_s", "JAX ref (scan, cuDNN, remat dots)"),
              ("jax_llama_ref", "jax_llama1b_xla_remat1", "tokens_per_s", "JAX ref (XLA attention, remat)")],
    "llama_packed": [("hf_padded_sft", f"batch{b}", "real_tokens_per_s", f"HF padded batch {b} (useful tok/s)")
                     for b in (4, 8, 16, 32)],
    "bert32": [("gpu_baseline", "torch_bert_base_cls_b32", "seqs_per_s", "HF+PyTorch eager")],
    "bert256": [("gpu_baseline", "torch_bert_base_cls_b256", "seqs_per_s", "HF+PyTorch eager")],
}
PEER_MAP["llama_tuned"] = PEER_MAP["llama"]


LLAMA_SMALL = dict(LLAMA_1B, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=1024, vocab_size=32000)
BERT_SMALL = dict(BERT_BASE, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)


def shapes(case: str, tiny) -> dict:
    kind = CASES[case][0]
    if tiny == "small":  # CPU profiling: big enough that matmuls and the vocabulary dominate, minutes not hours
        if kind in ("llama", "llama_packed"):
            return {"model": LLAMA_SMALL, "batch": 4, "seq": 512, "steps": 3}
        return {"model": BERT_SMALL, "batch": {"bert32": 32, "bert256": 256}[case] // 4, "seq": 128, "steps": 3}
    if kind in ("llama", "llama_packed"):
        return {"model": LLAMA_TINY if tiny else LLAMA_1B, "batch": 2 if tiny else 8, "seq": 64 if tiny else 2048,
                "steps": 3 if tiny else 10}
    batch = {"bert32": 32, "bert256": 256}[case]
    return {"model": BERT_TINY if tiny else BERT_BASE, "batch": max(2, batch // 8) if tiny else batch,
            "seq": 32 if tiny else 128, "steps": 3 if tiny else (30 if batch == 32 else 20)}


# ---- FLOPs ------------------------------------------------------------------------------------------------------

def llama_matmul_params(m: dict) -> int:
    h, n_layers, v = m["hidden_size"], m["num_hidden_layers"], m["vocab_size"]
    nh, nkv, inter = m["num_attention_heads"], m["num_key_value_heads"], m["intermediate_size"]
    hd = h // nh
    return n_layers * (h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * inter) + h * v  # + the LM head


def llama_flops(m: dict, segment_lengths) -> float:
    """Training FLOPs of a batch whose real tokens form segments of these lengths: 6 x matmul parameters per token,
    plus causal attention within each segment, 6·L·heads·head_dim·n per token of an n-token segment (the peers'
    count with n = seq)."""
    hd = m["hidden_size"] // m["num_attention_heads"]
    tokens = sum(segment_lengths)
    attn = 6 * m["num_hidden_layers"] * m["num_attention_heads"] * hd * sum(n * n for n in segment_lengths)
    return 6 * llama_matmul_params(m) * tokens + attn


def bert_flops(m: dict, batch: int, seq: int) -> float:
    h, n_layers = m["hidden_size"], m["num_hidden_layers"]
    n = n_layers * (4 * h * h + 2 * h * m["intermediate_size"])
    return (6 * n + 12 * n_layers * h * seq) * batch * seq


# ---- the runs ---------------------------------------------------------------------------------------------------

def matmul_ceiling(n: int, reps: int) -> float:
    """bf16 TFLOP/s of an n³ matmul on the default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        c = f(a, b)
    c.block_until_ready()
    return 2 * n**3 / ((time.perf_counter() - t) / reps) / 1e12


def peak_memory_gib() -> float | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without it
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**30


def apply_sets(config, sets: dict) -> None:
    for key, value in sets.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise SystemExit(f"--set {key}: no such config key")
        node[leaf] = value


def parse_value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def llama_features(case: str, shape: dict, rng):
    """causal_lm Features of synthetic rows: full rows with the first quarter prompt (llama), or the real SFT
    lengths packed into rows (llama_packed)."""
    import numpy as np

    from jaxsft.data.packing import pack, segment_layout
    from jaxsft.tasks.causal_lm import Features

    seq, vocab = shape["seq"], shape["model"]["vocab_size"]
    if CASES[case][0] == "llama":
        pairs = [(seq // 4, seq - seq // 4)] * (2 * shape["batch"])
    else:
        pairs = json.loads(LENGTHS.read_text())
        if seq < 2048:  # --tiny / --small: shorter examples so they still pack several to a row
            pairs = [(max(1, p * seq // 2048), max(1, c * seq // 2048)) for p, c in pairs]
        pairs = [(min(p, seq - 1), min(c, seq - min(p, seq - 1))) for p, c in pairs]
    lengths = np.asarray([p + c for p, c in pairs])
    groups = pack(lengths, seq) if CASES[case][0] == "llama_packed" else [np.asarray([i]) for i in range(len(pairs))]
    f = Features([], [], [], [], [], np.zeros(len(groups), np.int64))
    segments = []
    for r, g in enumerate(groups):
        seg, pos = segment_layout([int(lengths[i]) for i in g])
        f.input_ids.append(rng.integers(1, vocab, len(seg)).astype(np.int32))
        f.loss_tokens.append(np.concatenate([np.r_[np.zeros(pairs[i][0]), np.ones(pairs[i][1])] for i in g])
                             .astype(np.uint8))
        f.segment_ids.append(seg)
        f.positions.append(pos)
        f.rows.append(g)
        f.lengths[r] = len(seg)
        segments.append([int(lengths[i]) for i in g])
    return f, segments


def run_case(case: str, tiny, sets: dict, steps: int | None = None, memory_analysis: bool = False,
             hf_sets: dict | None = None, profile: str | None = None) -> dict:
    """Builds the case's model, optimizer and train step through jaxsft's pipeline and times it."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxsft import defaults, optim, parallel, pipeline, train
    from jaxsft.models import Functional, flatten_state

    kind, settings = CASES[case]
    shape = shapes(case, tiny)
    shape["model"] = {**shape["model"], **(hf_sets or {})}
    steps = steps or shape["steps"]
    config = defaults.base_config()
    config.model.name_or_path = "(random weights)"
    config.dtype, config.learning_rate, config.batch_size, config.max_length = "bfloat16", 1e-5, shape["batch"], \
        shape["seq"]
    config.max_steps, config.seed = 1000, 0
    if kind == "bert":
        from transformers import BertConfig

        config.task, config.model.num_labels = "classification", 2
        hf_config = BertConfig(**shape["model"], num_labels=2)
    else:
        from transformers import LlamaConfig

        config.task = "causal_lm"
        hf_config = LlamaConfig(**shape["model"])
    apply_sets(config, {**settings, **sets})
    task = pipeline.task_module(config)
    mesh = train.mesh_for(config)

    # --- what train._train_and_evaluate does with model.from_scratch, minus data loading and the workdir ---
    model, trainable = pipeline.build(hf_config, config, with_lora=False)
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    n_params = sum(int(v.size) for v in params.values())
    functional = Functional(model)
    del model
    tx, _ = optim.make_optimizer(config, config.max_steps)
    train_params, frozen = pipeline.split_trainable(params, trainable)
    shardings = parallel.state_shardings(pipeline.train_state(train_params, frozen,
                                                              jax.eval_shape(tx.init, train_params)),
                                         parallel.rules_for(hf_config), mesh)
    train_params = parallel.put(train_params, shardings["params"])
    state = pipeline.train_state(train_params, parallel.put(frozen, shardings.get("frozen", {})),
                                 jax.jit(tx.init, out_shardings=shardings["opt_state"])(train_params))
    del params, train_params, frozen
    step_fn = train.make_train_step(functional, task, tx, config, mesh, shardings)

    # --- batches (host numpy through the task's own collate, then global arrays), prepared before timing ---
    rng = np.random.default_rng(0)
    bs, seq = shape["batch"], shape["seq"]
    if kind == "bert":
        from jaxsft.tasks.classification import Features

        n = 2 * bs
        f = Features([rng.integers(1000, shape["model"]["vocab_size"], seq).astype(np.int32) for _ in range(n)],
                     [np.zeros(seq, np.int32) for _ in range(n)], rng.integers(0, 2, n), None,
                     np.full(n, seq, np.int64))
        plan = [np.arange(i, i + bs) for i in range(0, n, bs)]
        units = [bs] * len(plan)
        flops = [bert_flops(shape["model"], bs, seq)] * len(plan)
    else:
        f, segments = llama_features(case, shape, rng)
        order = rng.permutation(len(f))
        plan = [order[i:i + bs] for i in range(0, len(order), bs)][:steps + 2]  # cycled while timing
        units = [int(f.lengths[idx].sum()) for idx in plan]
        flops = [llama_flops(shape["model"], [n for i in idx for n in segments[i]]) for idx in plan]
    batches = [parallel.to_global(task.collate(f, idx, batch_size=bs, buckets=pipeline.buckets(config),
                                               pad_id=0), mesh) for idx in plan]
    computed = bs * max(b["input_ids"].shape[1] for b in batches)
    temp_gib = aot_s = None
    if memory_analysis:  # XLA's own count of the step's temporary buffers (works on CPU too); one more compile
        try:
            t0 = time.perf_counter()
            compiled = step_fn.lower(state, batches[0], np.int32(0)).compile()
            aot_s = time.perf_counter() - t0
            temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
        except Exception:  # noqa: BLE001 - backends without it
            temp_gib = None

    t0 = time.perf_counter()
    state, out = step_fn(state, batches[0], np.int32(0))
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    state, out = step_fn(state, batches[1 % len(batches)], np.int32(1))  # one more untimed step
    jax.block_until_ready(out)
    done_units = done_flops = 0.0
    t0 = time.perf_counter()
    for i in range(steps):  # no host sync inside: the state is donated, outputs fetched once at the end
        j = (i + 2) % len(batches)
        state, out = step_fn(state, batches[j], np.int32(i + 2))
        done_units += units[j]
        done_flops += flops[j]
    jax.block_until_ready((state, out))
    dt = time.perf_counter() - t0
    loss = float(out["loss_sum"] / max(float(out["count"]), 1.0))
    first_step_s = compile_s
    compile_s = max(first_step_s - dt / steps, 1e-3)  # time to the first result less one steady-state step
    if aot_s is not None:  # the jitted call then found the executable compiled ahead of time
        compile_s += aot_s
    result = {
        "case": case, "unit": "seq/s" if kind == "bert" else "tok/s",
        "throughput": done_units / dt, "tflops": done_flops / dt / 1e12, "step_ms": 1e3 * dt / steps,
        "compile_s": compile_s, "first_step_s": first_step_s, "aot_compile_s": aot_s,
        "peak_mem_gib": peak_memory_gib(), "temp_mem_gib": temp_gib, "loss": loss,
        "steps": steps,
        "params": n_params, "batch": bs, "seq": seq, "compilations": step_fn._cache_size(),
        "settings": {**settings, **sets, **{f"hf.{k}": v for k, v in (hf_sets or {}).items()}},
    }
    if kind == "llama_packed":
        result["useful_share"] = float(np.mean([u / computed for u in units]))
    if profile:  # a few more steps under the profiler, after the timing (which the trace would slow)
        from profile_kernels import summary

        folder = Path(profile) / case
        with jax.profiler.trace(str(folder)):
            for i in range(PROFILE_STEPS):
                state, out = step_fn(state, batches[i % len(batches)], np.int32(steps + 2 + i))
            jax.block_until_ready((state, out))
        try:
            text = summary(str(folder), PROFILE_STEPS)
        except Exception as e:  # noqa: BLE001 - the figures above stand without it
            text = f"profile summary failed: {type(e).__name__}: {e}"
        (Path(profile) / f"{case}_kernels.txt").write_text(text + "\n")
        print(text, file=sys.stderr, flush=True)
    return result


def run_peers(folder: Path, scripts: list[str], tiny: bool, timeout: int, quick: bool = False) -> dict:
    """{script: its JSON results (or {"error": ...})}, each script in its own process."""
    out = {}
    for script in scripts:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(folder / f"{script}.py"), "--out", tmp] + (["--tiny"] if tiny else [])
            if script == "gpu_baseline" and not tiny:
                cmd += ["--only", "fast" if quick else "all"]  # fast: without torch.compile
            env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
            t = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=folder)
                err = None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
            except subprocess.TimeoutExpired:
                err = f"timed out after {timeout} s"
            path = Path(tmp) / PEERS[script]
            data = json.loads(path.read_text()) if path.is_file() else {}
            if err:
                data["error"] = err
            data["wall_s"] = time.perf_counter() - t
            out[script] = data
        note = f" — {out[script]['error']}" if "error" in out[script] else ""
        print(f"peer {script}: {out[script]['wall_s']:.0f} s{note}", file=sys.stderr, flush=True)
    return out


def load_peers(folder: Path, scripts: list[str]) -> dict:
    """{script: its JSON results} read from files a peer run wrote before (--peer-results: gpu_check.sh runs the
    PyTorch peer first, so a table cut short still has its comparison); {"error": ...} where the file is missing."""
    out = {}
    for script in scripts:
        path = folder / PEERS[script]
        try:
            out[script] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            out[script] = {"error": f"{path}: {type(e).__name__}: {e}"}
        if "error" in out[script]:
            print(f"peer {script}: {out[script]['error']}", file=sys.stderr, flush=True)
    return out


def peer_rows(case: str, result: dict, peers: dict) -> list[dict]:
    rows = []
    for script, key, fld, label in PEER_MAP.get(case, []):
        value = peers.get(script, {}).get(key)
        if isinstance(value, dict) and isinstance(value.get(fld), (int, float)):
            ours = result.get("throughput")
            rows.append({"peer": label, "script": script, "key": key, "throughput": value[fld],
                         "tflops": value.get("tflops"),
                         "ratio": (ours / value[fld]) if ours and value[fld] else None})
    return rows


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[dict], ceiling: float, peers: dict | None) -> str:
    head = (f"{'case':<13} {'throughput':>16} {'TFLOP/s':>9} {'% ceiling':>9} {'step ms':>9} {'compile s':>9} "
            f"{'peak GiB':>8}  settings")
    lines = [f"matmul ceiling (bf16, measured here): {ceiling:.2f} TFLOP/s", head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<13} failed: {r['error']}")
            continue
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults"
        if "useful_share" in r:
            settings += f"; {100 * r['useful_share']:.1f}% of computed tokens useful"
        lines.append(f"{r['case']:<13} {r['throughput']:>10,.1f} {r['unit']:<5} {r['tflops']:>9.3f} "
                     f"{100 * r['tflops'] / ceiling:>8.1f}% {r['step_ms']:>9.1f} {r['compile_s']:>9.2f} "
                     f"{fmt(r['peak_mem_gib'], '8.2f'):>8}  {settings}"
                     + (f"; XLA temp {r['temp_mem_gib']:.3f} GiB" if r.get("temp_mem_gib") is not None else "")
                     + (f"; AOT compile {r['aot_compile_s']:.2f} s" if r.get("aot_compile_s") is not None else ""))
        for p in (r.get("peers") or []) if peers is not None else []:
            lines.append(f"  vs {p['peer']:<40} {p['throughput']:>12,.1f}  ours/peer {fmt(p['ratio'], '.2f')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes: the whole table on a CPU in under a minute")
    ap.add_argument("--small", action="store_true", help="CPU profiling shapes (Llama 4 x 256, vocab 32k, 4 x 512)")
    ap.add_argument("--memory-analysis", action="store_true",
                    help="also report XLA's temporary-buffer size of the compiled step (one more compile per case)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 10-30, 3 with --tiny)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, every case")
    ap.add_argument("--hf", action="append", default=[], metavar="KEY=VALUE",
                    help="model config override, every case (e.g. --hf num_hidden_layers=8)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write the results here")
    ap.add_argument("--peers", default=None, metavar="DIR", help="run the peer scripts in DIR beside ours")
    ap.add_argument("--peer-scripts", default=",".join(PEERS), help="which peer scripts (--peers)")
    ap.add_argument("--peer-timeout", type=int, default=900)
    ap.add_argument("--peer-quick", action="store_true", help="gpu_baseline without its torch.compile run")
    ap.add_argument("--peer-results", default=None, metavar="DIR",
                    help="read the peers' JSON files (baseline.json, ...) from DIR, written by an earlier run of "
                         "the peer scripts (--peer-scripts picks), instead of running them (--peers)")
    ap.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                    help="wall-clock budget of the whole run: each isolated case gets at most what is left, cases "
                         "that no longer fit are reported as skipped, and the table is still printed")
    ap.add_argument("--ceiling-n", type=int, default=None, help="matmul size for the ceiling (8192; 512 --tiny)")
    ap.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                    help="each case in its own process (default, except with --tiny)")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false", help="run every case in this process")
    ap.add_argument("--case-timeout", type=int, default=300, help="seconds per isolated case")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help=f"trace {PROFILE_STEPS} more steps per case with jax.profiler into DIR/CASE and write "
                         "DIR/CASE_kernels.txt, the GPU kernels by time (benchmarks/profile_kernels.py)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sets = {}
    for item in a.set:
        key, _, value = item.partition("=")
        sets[key] = parse_value(value)
    hf_sets = {k: parse_value(v) for k, _, v in (item.partition("=") for item in a.hf)}
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")

    if a.peers and a.peer_results:
        ap.error("--peers runs the peer scripts, --peer-results reads their results: one or the other")
    peer_scripts = [s.strip() for s in a.peer_scripts.split(",") if s.strip()]
    if [s for s in peer_scripts if s not in PEERS]:
        ap.error(f"unknown peer script(s) {[s for s in peer_scripts if s not in PEERS]}; known: {', '.join(PEERS)}")
    size = "small" if a.small else a.tiny
    if a.child:  # one case in this process: print its result as the last line
        try:
            result = run_case(a.child, size, sets, a.steps, a.memory_analysis, hf_sets, a.profile)
        except Exception as e:  # noqa: BLE001 - reported in the table, the other cases still run
            result = {"case": a.child, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if a.isolate is None:
        a.isolate = not (a.tiny or a.small)
    started = time.monotonic()
    if a.isolate or a.peers:  # other processes share the device: this one (the ceiling) must not take 75% of it,
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # and the cases (inheriting it) neither
    import jax

    n = a.ceiling_n or (512 if a.tiny else 2048 if a.small else 8192)
    ceiling = matmul_ceiling(n, 3 if a.tiny else 30)
    dev = jax.devices()[0]

    def write_json(peers=None) -> None:  # after every case, so a run cut short still leaves what it measured
        if not a.json:
            return
        out = {"device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count()},
               "versions": {"jax": jax.__version__, "flax": __import__("flax").__version__,
                            "optax": __import__("optax").__version__},
               "tiny": a.tiny, "small": a.small, "matmul_ceiling_tflops": ceiling, "matmul_ceiling_n": n,
               "results": results, "peers": peers}
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")

    results = []
    for case in cases:
        t = time.perf_counter()
        left = None if a.budget is None else a.budget - (time.monotonic() - started)
        if left is not None and left < 20:
            result = {"case": case, "error": f"skipped: the --budget of {a.budget:.0f} s is spent"}
        elif a.isolate:
            case_timeout = a.case_timeout if left is None else max(1, min(a.case_timeout, int(left - 5)))
            cmd = [sys.executable, __file__, "--child", case, *(["--tiny"] if a.tiny else []),
                   *(["--small"] if a.small else []), *(["--memory-analysis"] if a.memory_analysis else []),
                   *([f"--steps={a.steps}"] if a.steps else []), *(f"--set={s}" for s in a.set),
                   *(f"--hf={s}" for s in a.hf), *([f"--profile={a.profile}"] if a.profile else [])]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=case_timeout)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                result = json.loads(lines[-1][7:]) if lines else \
                    {"case": case, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
            except subprocess.TimeoutExpired:
                result = {"case": case, "error": f"timed out after {case_timeout} s"}
        else:
            try:
                result = run_case(case, size, sets, a.steps, a.memory_analysis, hf_sets, a.profile)
            except Exception as e:  # noqa: BLE001
                result = {"case": case, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        result["wall_s"] = time.perf_counter() - t
        results.append(result)
        print(f"{case}: {json.dumps(result)}", file=sys.stderr, flush=True)
        write_json()

    peers = None
    if a.peers or a.peer_results:
        if a.peer_results:
            peers = load_peers(Path(a.peer_results), peer_scripts)
        else:
            peers = run_peers(Path(a.peers).resolve(), peer_scripts, a.tiny, a.peer_timeout, a.peer_quick)
        for r in results:
            r["peers"] = peer_rows(r["case"], r, peers)
    print(f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}; jax {jax.__version__}"
          f"{' (--tiny shapes)' if a.tiny else ' (--small shapes)' if a.small else ''}")
    print(table(results, ceiling, peers))
    write_json(peers)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
