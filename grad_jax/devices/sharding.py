"""Meshes, shardings and host-local -> global arrays for data-parallel training.

The training step is "pjit-style": `jax.jit` with `in_shardings` / `out_shardings` over a
`Mesh` with one `data` axis (what `jax.experimental.pjit` became). Parameters are replicated,
batches are split along the batch axis over every device of every process.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
    """Join a multi-process run when the environment describes one.

    Set GRAD_JAX_COORDINATOR (host:port), GRAD_JAX_NUM_PROCESSES and GRAD_JAX_PROCESS_ID for
    hand-launched processes (several GPU hosts, or a local test); on Cloud TPU pods and SLURM
    clusters `jax.distributed.initialize()` finds everything itself when GRAD_JAX_DISTRIBUTED=1.
    """
    if jax.distributed.is_initialized():
        return
    coordinator = os.environ.get("GRAD_JAX_COORDINATOR")
    if coordinator:
        # CPU devices need a collectives library to talk across processes; the setting only
        # concerns the CPU backend (and must be made before any backend starts).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["GRAD_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["GRAD_JAX_PROCESS_ID"]),
        )
    elif os.environ.get("GRAD_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, what: str = "config.train.batch_size") -> int:
    """Validate that the global batch splits evenly; returns the per-process batch."""
    devices, processes = jax.device_count(), jax.process_count()
    if global_batch <= 0 or global_batch % devices:
        suggestion = max(devices, global_batch // devices * devices)
        raise ValueError(
            f"{what}={global_batch} must be a positive multiple of the {devices} devices in use "
            f"(each device takes an equal share); try {suggestion}"
        )
    return global_batch // processes


def process_rows(rows):
    """This process's contiguous share of a global batch's `rows` (an array or sequence): every
    process takes `len(rows) // process_count` rows, in process order."""
    share = len(rows) // jax.process_count()
    rank = jax.process_index()
    return rows[rank * share : (rank + 1) * share]


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into arrays sharded over the data axis."""
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def replicate(tree, mesh: Mesh):
    """Place a host-side pytree (the same on every process) replicated on every device.

    Leaves go through NumPy: a single-device jax.Array put on a multi-process sharding would
    not become a proper global array.
    """
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), tree)
