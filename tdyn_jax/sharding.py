"""Device mesh (data x fsdp), partition rules for parameters and optimizer state, multi-host init."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tdyn_jax.config import mesh_shape

BATCH_AXES = ("data", "fsdp")  # the batch is split over both axes
COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
    """Calls jax.distributed.initialize() when `mesh.distributed` is 'on', or 'auto' and a cluster is
    detected or a coordinator address is given; CPU processes then talk through gloo."""
    if cfg.distributed == "off" or jax.distributed.is_initialized():
        return
    detected = cfg.coordinator_address or (
        any(os.environ.get(k) for k in COORDINATOR_ENV)
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    )
    if cfg.distributed == "on" or detected:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            cfg.coordinator_address or None,
            cfg.num_processes or None,
            cfg.process_id if cfg.process_id >= 0 else None,
        )


def make_mesh(cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: all devices of all processes)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, ("data", "fsdp"), (AxisType.Auto,) * 2, devices=devices)


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> PartitionSpec:
    """Shards the largest axis divisible by `fsdp` over 'fsdp'; small arrays stay replicated."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec: list[Any] = [None] * len(shape)
            spec[axis] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int) -> Any:
    """NamedShardings for every leaf of a train state (parameters and optimizer state alike)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp, min_size)),
        abstract_state,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch-major arrays split over all devices."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
