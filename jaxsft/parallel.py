"""The device mesh (data, fsdp, tensor) from config, shardings, and process-local → global batches."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsft.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


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
    return Mesh(np.asarray(devices[:total]).reshape(sizes), AXES)


def data_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch → global arrays sharded over (data, fsdp)."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_host(x) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
