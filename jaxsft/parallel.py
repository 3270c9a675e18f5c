"""The device mesh (data, fsdp, tensor, expert), partition rules → shardings, multi-host start-up, host ↔ global arrays.

Sharding by rules: each model family keeps a `PARTITION_RULES` table of (regex over the flat parameter name,
PartitionSpec over the mesh axes); the first pattern found in a name wins, unmatched parameters are replicated.
Kernels are stored (in, out), so FSDP puts 'fsdp' on one large dimension and tensor parallelism puts 'tensor' on
the out-features of q/k/v and MLP up/gate, the in-features of the attention output and MLP down projections, and
the vocabulary of embeddings and LM heads. A dimension that does not divide by its axes' size is replicated over
them instead (tiny models, odd vocabularies). LoRA adapters follow the layer they adapt. Optimizer state is
sharded like the parameters whose structure it mirrors; everything else in it (step counts) is replicated.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsft.errors import UserError

log = logging.getLogger("jaxsft")

AXES = ("data", "fsdp", "tensor", "expert")  # expert: splits MoE experts (moe.py); tokens stay whole over it
BATCH_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, P]]


def make_mesh(mesh_config, devices=None) -> Mesh:
    """Axis sizes from config; one size of -1 takes the devices the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_config.get(a, 1)) for a in AXES]
    if sizes.count(-1) > 1:
        raise UserError("config.mesh: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(f"config.mesh: {len(devices)} devices do not divide into {dict(zip(AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    total = int(np.prod(sizes))
    if total > len(devices):
        raise UserError(f"config.mesh: {dict(zip(AXES, sizes))} needs {total} devices, only {len(devices)} exist")
    if jax.process_count() > 1 and total != len(devices):
        raise UserError(f"config.mesh: {dict(zip(AXES, sizes))} uses {total} of the {len(devices)} devices of "
                        f"{jax.process_count()} processes; a multi-host mesh must use them all")
    grid = np.asarray(devices[:total]).reshape(sizes)
    if devices[0].platform == "tpu" and total == len(devices):  # TPU: follow the physical torus (ICI) layout
        from jax.experimental import mesh_utils

        try:
            grid = mesh_utils.create_device_mesh(sizes, devices)
        except Exception as e:  # noqa: BLE001 - an odd shape for this topology: the plain order still works
            log.info("config.mesh: no topology-aware layout for %s (%s); using device order", sizes, e)
    return Mesh(grid, AXES)


def fitting_mesh(mesh_config) -> Mesh:
    """The run's mesh where this machine has the devices for it, else data-parallel over the devices there are
    (export and other single-host tools on a checkpoint trained on a bigger mesh)."""
    try:
        return make_mesh(mesh_config)
    except UserError as e:
        log.info("%s; using all %d devices data-parallel instead", e, jax.device_count())
        return make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def data_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---- partition rules → shardings ------------------------------------------------------------------------------

def rules_for(hf_config) -> Rules:
    """The partition rules of the checkpoint's model family."""
    from jaxsft.models.registry import family_for

    return tuple(getattr(family_for(hf_config), "PARTITION_RULES", ()))


def _rule_spec(name: str, rules: Rules) -> P | None:
    for pattern, spec in rules:
        if re.search(pattern, name):
            return spec
    return None


def _fit(spec: Sequence, shape: Sequence[int], axis_sizes: dict[str, int]) -> P:
    """`spec` with every entry whose axes do not divide that dimension dropped (replicated there)."""
    if len(spec) > len(shape):
        return P()
    out = []
    for entry, dim in zip(spec, shape):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        size = int(np.prod([axis_sizes.get(a, 1) for a in axes]))
        out.append(entry if axes and dim % size == 0 else None)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def spec_for(name: str, shape: Sequence[int], rules: Rules, axis_sizes: dict[str, int]) -> P:
    """The PartitionSpec of one parameter: its rule (LoRA adapters: derived from the adapted layer's rule),
    fitted to its shape; replicated when no rule matches."""
    from jaxsft.models import lora, stacked_parts

    spec = lora.adapter_spec(name, lambda base: _rule_spec(base, rules))
    if spec is None:
        spec = _rule_spec(name, rules)
    if spec is not None and stacked_parts(name) is not None:  # scanned layers: the leading layer axis is whole
        spec = P(None, *spec)
    return P() if spec is None else _fit(spec, shape, axis_sizes)


def param_specs(params: dict, rules: Rules, mesh: Mesh) -> dict[str, P]:
    sizes = dict(mesh.shape)
    return {k: spec_for(k, tuple(v.shape), rules, sizes) for k, v in params.items()}


def param_shardings(params: dict, rules: Rules, mesh: Mesh) -> dict[str, NamedSharding]:
    """{name: NamedSharding} for a flat dict of arrays (or anything with `.shape`)."""
    return {k: NamedSharding(mesh, s) for k, s in param_specs(params, rules, mesh).items()}


def state_shardings(state: dict, rules: Rules, mesh: Mesh):
    """Shardings for a train state {params, frozen?, opt_state}: the flat param dicts by rules; optimizer-state
    leaves that sit under a parameter's name with that parameter's shape (Adam moments, accumulated gradients)
    take its sharding, every other leaf (counts, scalars) is replicated."""
    flat = {**state.get("frozen", {}), **state["params"]}
    by_name = param_shardings(flat, rules, mesh)
    rep = replicated(mesh)

    def leaf(path, x):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if isinstance(name, str) and name in flat:
                return by_name[name] if tuple(x.shape) == tuple(flat[name].shape) else rep
        return rep

    out = {"params": {k: by_name[k] for k in state["params"]},
           "opt_state": jax.tree_util.tree_map_with_path(leaf, state["opt_state"])}
    if "frozen" in state:
        out["frozen"] = {k: by_name[k] for k in state["frozen"]}
    return out


def put(tree, shardings):
    """Host (or single-device) arrays → global arrays with these shardings; in a multi-host run every process
    holds the same host values and hands over only the pieces its own devices keep (global arrays move as they
    are)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global (a sharded load)
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def bytes_per_device(tree) -> dict[str, int]:
    """Bytes each addressable device holds for the arrays of `tree` (shows what sharding saves)."""
    out: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[str(shard.device)] = out.get(str(shard.device), 0) + shard.data.nbytes
    return out


# ---- batches --------------------------------------------------------------------------------------------------

def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """The global batch (the same numpy rows on every process) → global arrays sharded over (data, fsdp); each
    process transfers only the rows of its own devices."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index]) for k, v in batch.items()}


def local_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of a global batch of `batch_size` rows that this process's devices hold (split over (data, fsdp)):
    one contiguous range on the meshes make_mesh builds (the span of them, should a mesh interleave processes)."""
    spans = [idx[0].indices(batch_size)[:2] for idx in
             batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()]
    return slice(min(a for a, _ in spans), max(b for _, b in spans))


class GlobalBatches:
    """Index batches → global batch arrays. Each process collates only the rows its own devices hold
    (`collate(indices, rows=...)`: the shape comes from all the batch's indices, the arrays only from those rows)
    and hands them over as its part of the global arrays; no process builds the whole batch. `key(indices)`: what
    a batch's shapes depend on (its padded lengths), so `shapes` collates one batch per key only."""

    def __init__(self, collate, batch_size: int, mesh: Mesh, key=None):
        self.collate, self.batch_size, self.mesh, self.key = collate, batch_size, mesh, key
        self.rows = local_rows(mesh, batch_size)
        self.sharding = batch_sharding(mesh)
        self._shapes: dict = {}

    def local(self, indices) -> dict[str, np.ndarray]:
        return self.collate(indices, rows=self.rows)

    def shapes(self, indices) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch's shapes and dtypes (for compiling ahead; nothing goes to a device)."""
        key = None if self.key is None else self.key(indices)
        if key is None or key not in self._shapes:
            out = {k: jax.ShapeDtypeStruct((self.batch_size,) + v.shape[1:], v.dtype)
                   for k, v in self.local(indices).items()}
            if key is None:
                return out
            self._shapes[key] = out
        return self._shapes[key]

    def __call__(self, indices) -> dict[str, jax.Array]:
        local, start = self.local(indices), self.rows.start
        if jax.process_count() == 1 and self.rows == slice(0, self.batch_size):
            return jax.device_put(local, self.sharding)

        def one(v):
            def piece(index):
                a, b, _ = index[0].indices(self.batch_size)
                return v[(slice(a - start, b - start), *index[1:])]

            return jax.make_array_from_callback((self.batch_size,) + v.shape[1:], self.sharding, piece)

        return {k: one(v) for k, v in local.items()}


_COLLECTIVE = re.compile(r"= (\(?[a-z0-9]+\[[^=]*?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8}


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"ops", "bytes"}} of the cross-device collectives in an optimized HLO module's text
    (`jit(f).lower(...).compile().as_text()`): what a step sends between devices, per device."""
    out: dict[str, dict[str, int]] = {}
    # /*index=5*/ comments inside a tuple of results would end the result shapes at their '=': dropped first
    for line in re.sub(r"/\*.*?\*/", "", hlo_text).splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        size = sum(int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * _ITEMSIZE.get(dtype, 4)
                   for dtype, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", m.group(1)))
        entry = out.setdefault(m.group(2), {"ops": 0, "bytes": 0})
        entry["ops"] += 1
        entry["bytes"] += size
    return out


def to_host(x) -> np.ndarray:
    """A global array's value on this host (gathered from every process in a multi-process run, so all of them
    must call it); local arrays as they are."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ---- multi-host -----------------------------------------------------------------------------------------------

def initialize_distributed() -> None:
    """`jax.distributed.initialize` for `--multihost`: coordinator, process count and id from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID when set (local and custom launches), else detected (TPU pods, SLURM, MPI).
    When a process dies, the others stop (abort with a line naming the dead task) instead of hanging in a
    collective: at once if it was the coordinator (process 0), else within JAXSFT_HEARTBEAT_TIMEOUT_S (default 60
    s, 42 s measured; JAX's own default is 100). On CPU, collectives go through gloo."""
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        try:  # JAX's default today; explicit, as older releases had none
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, ValueError):
            pass
    def env_int(name: str, default: int | None = None) -> int | None:
        value = os.environ.get(name)
        if not value:
            return default
        try:
            return int(value)
        except ValueError:
            raise UserError(f"--multihost: {name}={value!r} is not an integer") from None

    kwargs = {k: v for k, v in (("num_processes", env_int("JAX_NUM_PROCESSES")),
                                ("process_id", env_int("JAX_PROCESS_ID"))) if v is not None}
    accepted = inspect.signature(jax.distributed.initialize).parameters
    for key, env, default in (("heartbeat_timeout_seconds", "JAXSFT_HEARTBEAT_TIMEOUT_S", 60),
                              ("initialization_timeout", "JAXSFT_INIT_TIMEOUT_S", 300),
                              ("shutdown_timeout_seconds", "JAXSFT_SHUTDOWN_TIMEOUT_S", 60)):
        if key in accepted:
            kwargs[key] = env_int(env, default)
    jax.distributed.initialize(**kwargs)
    if jax.process_index() != 0:  # one process speaks for the run; warnings and errors still show everywhere
        logging.getLogger("jaxsft").setLevel(logging.WARNING)
    log.info("multi-host: process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def broadcast_text(text: str | None, limit: int = 4096) -> str | None:
    """Process 0's `text` (or None) on every process (a collective: all of them must call it); at most `limit`
    UTF-8 bytes of it travel."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    buf = np.zeros(limit + 1, np.uint8)  # [0]: 1 when there is a text; then its bytes, 0-padded
    if text is not None:
        data = text.encode()[:limit]
        buf[0], buf[1:1 + len(data)] = 1, np.frombuffer(data, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    if not got[0]:
        return None
    return got[1:].tobytes().rstrip(b"\0").decode(errors="replace")
