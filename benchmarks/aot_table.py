"""What fits where: `python -m jaxsft.aot` (the real train step compiled by the TPU compiler on this CPU host) for
real model shapes on v5e-8, v5p-8 and v6e-8. Writes config.json folders (real architecture numbers, no weights)
and prints a markdown table: fits or not, memory per chip, and the compiler's estimated tokens/s and MFU.

COMMAND: python benchmarks/aot_table.py            (needs libtpu: pip install -e ".[aot]"; about 20-40 min on 2 cores)
         python benchmarks/aot_table.py --models llama-3.2-1b,bert-base --topologies v5e-8 --json out.json
         python benchmarks/aot_table.py --models llama-3.2-1b --topologies v5e-8 --set model.attention=xla

Settings per model (sensible defaults for the shape, not tuned): decoders bf16, batch 8 x 2048 packed, remat dots,
scanned layers (not with LoRA), loss in chunks of 1024 tokens, FSDP over all chips; BERT-base classification
batch 256 x 128 and T5-base translation batch 128 x (128 + 128), data-parallel, bf16.
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
GiB = 1024**3

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192}
# (config class, config.json fields): the published checkpoints' numbers.
ARCHS = {
    "llama-3.2-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                         head_dim=64, tie_word_embeddings=True, max_position_embeddings=131072,
                                         rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5)),
    "llama-3.1-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         tie_word_embeddings=False, max_position_embeddings=131072,
                                         rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 8.0},
                                         rms_norm_eps=1e-5)),
    "qwen2.5-14b": ("Qwen2Config", dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                                        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                                        tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1e6,
                                        rms_norm_eps=1e-5)),
    "qwen2.5-32b": ("Qwen2Config", dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                                        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                                        tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1e6,
                                        rms_norm_eps=1e-5)),
    "bert-base": ("BertConfig", dict(vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, max_position_embeddings=512, num_labels=2)),
    "t5-base": ("T5Config", dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                                 feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0)),
}

DECODER = ["--config.dtype=bfloat16", "--config.batch_size=8", "--config.max_length=2048",
           "--config.model.remat=dots", "--config.chunked_loss_size=1024", "--config.mesh.data=1",
           "--config.mesh.fsdp=-1"]
# (label, arch, config file, overrides)
RUNS = {
    "llama-3.2-1b": ("Llama-3.2-1B full SFT", "configs/sft.py", DECODER + ["--config.model.scan_layers=true"]),
    "llama-3.1-8b": ("Llama-3.1-8B full SFT", "configs/sft.py", DECODER + ["--config.model.scan_layers=true"]),
    "qwen2.5-14b": ("Qwen2.5-14B full SFT", "configs/sft.py", DECODER + ["--config.model.scan_layers=true"]),
    "qwen2.5-32b": ("Qwen2.5-32B LoRA r=16 (q,k,v,o)", "configs/sft.py", DECODER + ["--config.lora.rank=16"]),
    "bert-base": ("BERT-base classification", "configs/classify.py",
                  ["--config.dtype=bfloat16", "--config.batch_size=256", "--config.max_length=128",
                   "--config.model.num_labels=2", "--config.model.scan_layers=true"]),
    "t5-base": ("T5-base translation", "configs/translate.py",
                ["--config.dtype=bfloat16", "--config.batch_size=128", "--config.max_length=128",
                 "--config.data.max_target_length=128"]),
}
TOPOLOGIES = ("v5e-8", "v5p-8", "v6e-8")


def write_configs(folder: Path, names) -> dict[str, Path]:
    import transformers

    out = {}
    for name in names:
        cls, fields = ARCHS[name]
        path = folder / name
        getattr(transformers, cls)(**fields).save_pretrained(path)
        out[name] = path
    return out


def run_one(name: str, path: Path, topology: str, timeout: int, workdir: Path, extra: list[str] = ()) -> dict:
    _, config_file, overrides = RUNS[name]
    out = workdir / f"{name}_{topology}.json"
    cmd = [sys.executable, "-m", "jaxsft.aot", "--config", config_file, "--topology", topology,
           f"--config.model.name_or_path={path}", *overrides, *extra, "--json", str(out)]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
    except subprocess.TimeoutExpired:
        return {"error": f"compile over {timeout} s", "seconds": time.time() - start}
    result = json.loads(out.read_text()) if out.exists() else {}
    if proc.returncode not in (0, 2) or not result:
        result["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
    result["seconds"] = time.time() - start
    return result


def row(name: str, topology: str, r: dict) -> str:
    label = RUNS[name][0]
    if "error" in r:
        return f"| {label} | {topology} | ? | {r['error']} | | |"
    mem = f"{r['total_bytes'] / GiB:.1f} / {r['hbm_bytes'] / GiB:.2f}" if r.get("total_bytes") else \
        f"> {r['hbm_bytes'] / GiB:.2f}"
    state = f" (state {r['state_bytes'] / GiB:.1f})"
    if not r["fits"]:
        return f"| {label} | {topology} | no | {mem}{state} | | |"
    tps = f"{r['tokens_per_second']:,.0f}" if r.get("tokens_per_second") else "?"
    mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") else "?"
    return f"| {label} | {topology} | yes | {mem}{state} | {tps} | {mfu} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--topologies", default=",".join(TOPOLOGIES))
    p.add_argument("--timeout", type=int, default=600, help="seconds per compile before giving up on it")
    p.add_argument("--json", default=None, help="write every report here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run, after the defaults above (repeatable), e.g. "
                        "--set model.attention=xla --set batch_size=4 --set max_length=8192")
    args = p.parse_args()
    extra = [f"--config.{kv}" for kv in args.set]
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="aot_table_") as tmp:
        paths = write_configs(Path(tmp), names)
        results = {}
        print("| run | slice | fits | GiB per chip: total / HBM (params + opt state) | est. tokens/s | est. MFU |")
        print("| --- | --- | --- | --- | --- | --- |", flush=True)
        for name in names:
            for topology in [t.strip() for t in args.topologies.split(",") if t.strip()]:
                r = run_one(name, paths[name], topology, args.timeout, Path(tmp), extra)
                results[f"{name} {topology}"] = r
                print(row(name, topology, r), flush=True)
                print(f"    ({name} on {topology}: {r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
