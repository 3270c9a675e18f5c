"""Will this run fit, and how fast might it be, on that TPU slice? Compiles the real train step for a TPU topology
with the real TPU compiler (libtpu) on this host, no TPU needed:

    python -m jaxsft.aot --config configs/sft.py --topology v5e-8 [--config.key=value ...]
        [--batch_size N] [--length T] [--target_length U] [--json FILE]

The step is the one `jaxsft.run` builds (jaxsft.aot_steps: train.make_train_step over the config's mesh on the
topology's chips), with abstract weights: only the model's config.json is read (a local folder, or a hub id whose
config.json alone is downloaded). Printed per chip: parameters + optimizer state, temporaries, generated code and
their total against the chip's HBM; the step's FLOPs; bytes of each collective; and the compiler's own estimate of
the step time with the tokens/s and MFU it implies (an estimate from XLA's cost model, not a measurement). A run
that does not fit exits 2 with one line saying by how much and which knob would help. Needs libtpu
(`pip install -e ".[aot]"`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass

from jaxsft import cli
from jaxsft.errors import UserError, first_line, run_cli

log = logging.getLogger("jaxsft")
GiB = 1024**3


@dataclass(frozen=True)
class Chip:
    kind: str
    hbm: int  # bytes the TPU compiler lets one program use (what its out-of-memory errors name as available HBM)
    hbm_nominal_gb: int  # the data sheet's per-chip HBM
    peak_flops: float  # bf16 dense, per chip
    hbm_bandwidth: float  # bytes/s


# Per-chip bf16 peak and HBM from Cloud TPU's system architecture pages: v5e 197 TFLOP/s, 16 GB
# (https://cloud.google.com/tpu/docs/v5e), v5p 459 TFLOP/s, 95 GB (https://cloud.google.com/tpu/docs/v5p),
# v6e 918 TFLOP/s, 32 GB (https://cloud.google.com/tpu/docs/v6e); HBM bandwidth 819, 2765, 1638 GB/s. `hbm` is
# what libtpu 0.0.42's compiler reports as available HBM for these chips (15.75G, 95.74G, 31.25G): the figure a
# program is checked against.
CHIPS = {
    "v5e": Chip("TPU v5e", int(15.75 * GiB), 16, 197e12, 819e9),
    "v5p": Chip("TPU v5p", int(95.74 * GiB), 95, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", int(31.25 * GiB), 32, 918e12, 1638e9),
}


@dataclass(frozen=True)
class Topology:
    name: str  # as Cloud TPU names the accelerator type (v5e-8, v5p-32)
    chip: str  # key of CHIPS
    layout: str  # libtpu's topology name
    chips_per_host: tuple[int, int, int]

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.layout.split(":")[1].split("x"))

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host)


def _topologies() -> dict[str, Topology]:
    """Accelerator type → layout. v5e / v6e: one host of up to 8 chips (ct5lp-hightpu-8t, ct6e-standard-8t),
    4 chips per host beyond; v5p: 4 chips per host (v5p-N counts TensorCores, 2 per chip). As MaxText's
    accelerator_to_spec_map.py lays them out."""
    out = {}
    for chip, layouts in (("v5e", ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
                          ("v6e", ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"))):
        for layout in layouts:
            a, b = (int(x) for x in layout.split("x"))
            per_host = (a, b, 1) if a * b <= 8 else (2, 2, 1)
            out[f"{chip}-{a * b}"] = Topology(f"{chip}-{a * b}", chip, f"{chip}:{layout}", per_host)
    for layout in ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"):
        n = math.prod(int(x) for x in layout.split("x"))
        out[f"v5p-{2 * n}"] = Topology(f"v5p-{2 * n}", "v5p", f"v5p:{layout}", (2, 2, 1))
    return out


TOPOLOGIES = _topologies()


def parse_topology(name: str) -> Topology:
    """`v5e-8` (accelerator type) or a layout such as `v5e:2x4` / `v5p:2x2x4`."""
    key = name.strip().lower().replace("v5litepod", "v5e")
    if key in TOPOLOGIES:
        return TOPOLOGIES[key]
    for t in TOPOLOGIES.values():
        if t.layout == key or t.layout == key.replace("v5:", "v5p:"):
            return t
    raise UserError(f"--topology {name!r}: unknown; one of {', '.join(TOPOLOGIES)} (or a layout like v5e:2x4)")


# ---- the TPU compiler -----------------------------------------------------------------------------------------

def require_libtpu() -> None:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError('the TPU compiler (libtpu) is not installed: pip install -e ".[aot]"') from None


@contextlib.contextmanager
def _quiet_native_stderr(enabled: bool):
    """libtpu prints TPU-VM detection warnings (no TPU here) on file descriptor 2: kept aside unless `enabled` is
    False; shown if the block fails."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            tmp.seek(0)
            log.debug(tmp.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(topo: Topology, quiet: bool = True) -> list:
    """The slice's compile-only TPU devices (all hosts')."""
    require_libtpu()
    # Another process holding libtpu's lock file (any JAX program started with libtpu installed takes it) must not
    # stop a compile-only client, which touches no chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    with _quiet_native_stderr(quiet):
        desc = topologies.get_topology_desc(topology_name=topo.layout, platform="tpu",
                                            chips_per_host_bounds=topo.chips_per_host, num_slices=1)
    return list(desc.devices)


# ---- the model and the step -----------------------------------------------------------------------------------

def hf_config_for(name_or_path: str):
    """The checkpoint's HF config from config.json alone: a local folder, or only config.json of a hub id."""
    from pathlib import Path

    from jaxsft import hf_io, pipeline

    p = Path(os.path.expanduser(name_or_path))
    if p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        return pipeline.load_hf_config(hf_io.resolve(name_or_path), "model.name_or_path")
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(name_or_path, "config.json"))
    except Exception as e:  # noqa: BLE001 - offline, unknown or gated repo
        raise UserError(f"model.name_or_path: cannot get config.json of {name_or_path!r} from the Hugging Face hub "
                        f"({type(e).__name__}; offline or unknown id?) and no such local folder exists") from None
    return pipeline.load_hf_config(path.parent, "model.name_or_path")


def shapes(config, args) -> tuple[int, int, int | None]:
    """(batch size, length, target length): the flags, else the config's batch_size / max_length (seq2seq targets:
    data.max_target_length, else max_length)."""
    b = args.batch_size or config.batch_size
    t = args.length or config.max_length
    u = None
    if config.task == "seq2seq":
        u = args.target_length or config.data.get("max_target_length") or config.max_length
    for name, v in (("--batch_size", b), ("--length", t), ("--target_length", u)):
        if v is not None and v <= 0:
            raise UserError(f"{name} must be > 0, got {v}")
    return b, t, u


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs carrying NamedShardings (the most any chip holds)."""
    import jax
    import numpy as np

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def param_count(tree) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


_SIZE = re.compile(r"([0-9.]+)\s*([KMGT]?)i?B?\b")


def _bytes(text: str) -> int:
    n, unit = _SIZE.match(text).groups()
    return int(float(n) * 1024 ** " KMGT".index(unit or " "))


def oom_figures(message: str) -> tuple[int | None, int | None]:
    """(bytes required, bytes available) from the TPU compiler's out-of-memory message, where it names them."""
    m = re.search(r"\(([0-9.]+[KMGT]?)\) exceeds available HBM \(([0-9.]+[KMGT]?)\)", message)
    if m:
        return _bytes(m.group(1)), _bytes(m.group(2))
    m = re.search(r"Used ([0-9.]+[KMGT]?) of ([0-9.]+[KMGT]?) hbm", message)
    if m:
        return _bytes(m.group(1)), _bytes(m.group(2))
    return None, None


@dataclass
class Report:
    topology: str
    chips: int
    hosts: int
    chip: str
    mesh: dict
    batch_size: int
    length: int
    target_length: int | None
    tokens_per_step: int
    params: int
    trainable_params: int
    hbm_bytes: int
    state_bytes: int = 0  # parameters + optimizer state per chip
    batch_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    output_bytes: int = 0  # outputs not written in place of the donated state
    total_bytes: int = 0
    fits: bool = False
    flops: float | None = None  # per chip per step, XLA's count
    collectives: dict | None = None
    estimated_seconds: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    cost_note: str = ""
    time_source: str = "XLA's cost model (optimal_seconds)"
    message: str = ""


def _compile(config, hf_config, mesh, b: int, t: int, u: int | None, quiet: bool):
    """(compiled train step, Built, abstract batch) of `config` on `mesh`, for the TPU."""
    from jaxsft import aot_steps
    from jaxsft.models import layers

    built = aot_steps.build(config, hf_config, mesh)
    fn, step_args = aot_steps.train_step(built, b, t, u)
    # Never through the persistent compilation cache: an executable for a topology without a client cannot be
    # read back from it, and the compile time this tool reports must be the compiler's.
    with layers.target_platform("tpu"), _quiet_native_stderr(quiet), _no_cache():
        return fn.lower(*step_args).compile(), built, step_args[1]


@contextlib.contextmanager
def _no_cache():
    import jax

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def _cost(compiled) -> dict:
    from jaxsft import parallel

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "seconds": float(cost.get("optimal_seconds", 0.0)),
            "bytes": float(cost.get("bytes accessed", 0.0)),
            "collectives": parallel.collectives(compiled.as_text())}


def _has_loops(config, built) -> bool:
    from jaxsft.models import stacked_parts

    scanned = any(stacked_parts(k) is not None for k in built.state["params"]) or any(
        stacked_parts(k) is not None for k in built.state.get("frozen", {}))
    return scanned or config.gradient_accumulation_steps > 1


def unrolled_cost(config, hf_config, mesh, b: int, t: int, u: int | None, quiet: bool) -> dict:
    """XLA's cost analysis counts a loop body once, whatever its trip count: a scanned layer stack
    (model.scan_layers) or gradient accumulation would show one layer / one micro-batch. This compiles the same
    step unrolled with 1 and 2 layers and one micro-batch (b / k rows), and extrapolates:
    k · (c1 + (L - 1) · (c2 - c1)) for FLOPs, estimated time and collective bytes."""
    import copy

    k = config.gradient_accumulation_steps
    layers_total = int(hf_config.num_hidden_layers)
    costs = []
    for n in (1, 2):
        cfg, hf = copy.deepcopy(config), copy.deepcopy(hf_config)
        cfg.model.scan_layers, cfg.gradient_accumulation_steps = False, 1
        hf.num_hidden_layers = n
        if getattr(hf, "layer_types", None):
            hf.layer_types = list(hf.layer_types)[:n]
        costs.append(_cost(_compile(cfg, hf, mesh, b // k, t, u, quiet)[0]))
    c1, c2 = costs

    def extrapolate(a: float, b_: float) -> float:
        return k * (a + (layers_total - 1) * (b_ - a))

    kinds = set(c1["collectives"]) | set(c2["collectives"])
    zero = {"ops": 0, "bytes": 0}
    coll = {kind: {f: int(extrapolate(c1["collectives"].get(kind, zero)[f], c2["collectives"].get(kind, zero)[f]))
                   for f in ("ops", "bytes")} for kind in kinds}
    seconds = extrapolate(c1["seconds"], c2["seconds"]) if min(c1["seconds"], c2["seconds"]) > 0 else -1.0
    return {"flops": extrapolate(c1["flops"], c2["flops"]), "seconds": seconds,
            "bytes": extrapolate(c1["bytes"], c2["bytes"]), "collectives": coll}


def compile_step(config, topo: Topology, b: int, t: int, u: int | None, quiet: bool = True) -> Report:
    """Compiles the train step of `config` for `topo` and reads the compiler's memory and cost analyses."""
    from jaxsft import parallel

    devices = topology_devices(topo, quiet)
    mesh = parallel.make_mesh(config.mesh, devices=devices)
    per_step = parallel.data_shards(mesh) * config.gradient_accumulation_steps
    if b % per_step:
        raise UserError(f"batch size {b} is not divisible by data x fsdp shards ({parallel.data_shards(mesh)}) x "
                        f"gradient_accumulation_steps ({config.gradient_accumulation_steps}) on {topo.name}")
    hf_config = hf_config_for(config.model.name_or_path)
    chip = CHIPS[topo.chip]
    try:
        compiled, built, batch = _compile(config, hf_config, mesh, b, t, u, quiet)
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory verdict is an answer, not a failure
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        from jaxsft import aot_steps

        built = aot_steps.build(config, hf_config, mesh)
        report = _report(topo, mesh, built, aot_steps.abstract_batch(config, b, t, mesh, u), b, t, u)
        needed, available = oom_figures(str(e))
        report.hbm_bytes = available or chip.hbm
        report.total_bytes = needed or 0
        report.message = first_line(e)[:300]
        return report
    report = _report(topo, mesh, built, batch, b, t, u)
    mem = compiled.memory_analysis()
    report.temp_bytes = int(mem.temp_size_in_bytes)
    report.code_bytes = int(mem.generated_code_size_in_bytes)
    report.output_bytes = max(0, int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes))
    report.total_bytes = (int(mem.argument_size_in_bytes) + report.output_bytes + report.temp_bytes
                          + report.code_bytes)
    report.fits = report.total_bytes <= report.hbm_bytes
    if not report.fits:
        return report
    if _has_loops(config, built):
        cost = unrolled_cost(config, hf_config, mesh, b, t, u, quiet)
        report.cost_note = "extrapolated from the step compiled unrolled with 1 and 2 layers (loops count once)"
    else:
        cost = _cost(compiled)
    report.flops = cost["flops"] or None
    report.collectives = cost["collectives"]
    seconds = cost["seconds"]
    if seconds <= 0 and cost["flops"] > 0:  # libtpu 0.0.42 gives a negative optimal_seconds for real-size steps
        seconds = max(cost["flops"] / chip.peak_flops, cost["bytes"] / chip.hbm_bandwidth)
        report.time_source = (f"roofline max(FLOPs / peak, bytes accessed / HBM bandwidth) of XLA's counts; the "
                              f"compiler's own optimal_seconds was {cost['seconds']:.3g}, unusable")
    if seconds > 0:
        report.estimated_seconds = seconds
        report.tokens_per_second = report.tokens_per_step / seconds
        report.mfu = model_flops(report) / (seconds * topo.chips * chip.peak_flops)
    return report


def _report(topo: Topology, mesh, built, batch, b: int, t: int, u: int | None) -> Report:
    state = built.state
    chip = CHIPS[topo.chip]
    return Report(topo.name, topo.chips, topo.hosts, chip.kind, dict(mesh.shape), b, t, u, b * (t + (u or 0)),
                  param_count({**state.get("frozen", {}), **state["params"]}), param_count(state["params"]),
                  chip.hbm, state_bytes=per_chip_bytes(state), batch_bytes=per_chip_bytes(batch))


def model_flops(report: Report) -> float:
    """Model FLOPs of one step: 6·N per token (forward + both backward matmuls) for full fine-tuning; with LoRA
    the frozen weights need no weight gradient, 4·N. N counts every parameter; attention scores not counted."""
    frozen = report.params - report.trainable_params
    return report.tokens_per_step * (6 * report.trainable_params + 4 * frozen)


# ---- verdict --------------------------------------------------------------------------------------------------

def knob(report: Report, config) -> str:
    """The setting most likely to bring the step under the chip's HBM."""
    mesh = report.mesh
    sharded_state = report.state_bytes * mesh.get("fsdp", 1) * mesh.get("tensor", 1) / report.chips
    fsdp_all = mesh.get("fsdp", 1) * mesh.get("tensor", 1) < report.chips
    if fsdp_all and report.state_bytes > 0.25 * report.hbm_bytes:
        return (f"--config.mesh.data=1 --config.mesh.fsdp=-1 (parameters + optimizer state sharded over all "
                f"{report.chips} chips: about {sharded_state / GiB:.1f} GiB per chip instead of "
                f"{report.state_bytes / GiB:.1f})")
    if report.state_bytes > 0.7 * report.hbm_bytes:
        if config.lora.rank <= 0:
            return (f"--config.lora.rank=16 (LoRA; parameters + optimizer state alone take "
                    f"{report.state_bytes / GiB:.1f} GiB per chip) or a bigger slice")
        return f"a bigger slice (the frozen weights alone take {report.state_bytes / GiB:.1f} GiB per chip)"
    if config.model.remat == "none":
        return "--config.model.remat=dots (or full)"
    if config.task == "causal_lm" and not config.chunked_loss_size:
        return "--config.chunked_loss_size=1024 (the loss over 1024 tokens at a time)"
    if config.model.remat == "dots":
        return ("--config.model.remat=full, or a smaller --config.batch_size with "
                "--config.gradient_accumulation_steps to keep the global batch")
    return "a smaller --config.batch_size with --config.gradient_accumulation_steps to keep the global batch"


def verdict(report: Report, config) -> str:
    over = report.total_bytes - report.hbm_bytes
    need = f"needs {report.total_bytes / GiB:.2f} GiB per chip" if report.total_bytes else "needs more HBM"
    how_much = f" ({over / GiB:.2f} GiB over)" if report.total_bytes else f" ({report.message})"
    return (f"does not fit on {report.topology}: {need} of {report.hbm_bytes / GiB:.2f} GiB{how_much}; try "
            f"{knob(report, config)}")


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def summary(report: Report) -> str:
    lines = [f"{report.topology}: {report.chips} x {report.chip} ({report.hosts} host{'s' * (report.hosts > 1)}), "
             f"mesh {report.mesh}",
             f"step: batch {report.batch_size} x {report.length}"
             + (f" (+ {report.target_length} target)" if report.target_length else "")
             + f" = {report.tokens_per_step} tokens; {report.params / 1e6:,.1f}M parameters, "
               f"{report.trainable_params / 1e6:,.1f}M trained",
             "per chip:",
             f"  parameters + optimizer state {_gib(report.state_bytes)}",
             f"  batch                        {_gib(report.batch_bytes)}",
             f"  temporaries                  {_gib(report.temp_bytes)}",
             f"  outputs (not in place)       {_gib(report.output_bytes)}",
             f"  generated code               {_gib(report.code_bytes)}",
             f"  total                        {_gib(report.total_bytes)} of {report.hbm_bytes / GiB:.2f} GiB HBM "
             f"({'fits' if report.fits else 'DOES NOT FIT'}, {100 * report.total_bytes / report.hbm_bytes:.0f}%)"]
    if report.flops:
        lines.append(f"FLOPs per chip per step (XLA's count): {report.flops:.3e}")
    for kind, c in sorted((report.collectives or {}).items()):
        lines.append(f"  {kind:18s} {c['ops']:4d} ops {c['bytes'] / 2**20:12.1f} MiB per chip per step")
    if report.estimated_seconds:
        lines.append(f"estimated step time (not a measurement; {report.time_source}): "
                     f"{report.estimated_seconds * 1e3:.1f} "
                     f"ms per step, {report.tokens_per_second:,.0f} tokens/s, MFU {100 * report.mfu:.0f}% "
                     "(6·N FLOPs per token trained, 4·N frozen)")
        if report.cost_note:
            lines.append(f"  ({report.cost_note})")
    else:
        lines.append("compiler's estimate: none (this libtpu reports no optimal_seconds)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    config, rest = cli.config_from_args(argv)
    p = cli.parser("jaxsft.aot", __doc__)
    p.add_argument("--topology", required=True, help="TPU slice: v5e-8, v5p-8, v6e-8, v5p-32, ... (or v5e:2x4)")
    p.add_argument("--batch_size", type=int, default=None, help="global batch (default: config.batch_size)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default: config.max_length)")
    p.add_argument("--target_length", type=int, default=None,
                   help="seq2seq target length (default: data.max_target_length, else max_length)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    args = p.parse_args(rest)
    topo = parse_topology(args.topology)
    from jaxsft import train

    train.validate(config)
    b, t, u = shapes(config, args)
    require_libtpu()
    report = compile_step(config, topo, b, t, u, quiet=not args.verbose)
    if not report.fits:
        report.message = verdict(report, config)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report), f, indent=1)
    if not report.fits:
        raise UserError(report.message)
    print(summary(report), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never claim this machine's accelerators
    run_cli(main, sys.argv[1:])
