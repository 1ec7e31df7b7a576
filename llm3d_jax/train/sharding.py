"""Device mesh, the logical-axis rules table, and the shardings derived from them.

Parameters carry logical axis names (`nn.with_logical_partitioning`, names fixed in
docs/architecture.md), and so do the main activations (`nn.with_logical_constraint` at block
boundaries and on the heads / mlp / vocab dims inside the Q-Former and the LLMs); `RULES` maps
them onto the mesh axes `('data', 'fsdp', 'tensor')`. Changing how a model is laid out over
devices means changing this table, nothing else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from llm3d_jax.fileio import InputError

MESH_AXES = ("data", "fsdp", "tensor")
# The mesh axes the batch dimension is split over (logical `batch`; every batch array).
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes). One entry per name in docs/architecture.md.
# An array dimension takes the first rule whose mesh axes are still free in that array, so an
# activation [batch, length, embed] shards batch over data+fsdp and its length over tensor (the
# residual stream between blocks is sequence-parallel), while [batch, length, heads|mlp|vocab]
# keeps its length whole and splits heads / mlp / vocab over tensor (`length` comes last).
RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("enc_embed", None),
    ("queries", None),
    ("relpos", None),
    ("norm", None),
    ("layers", None),
    ("pos", None),
    ("length", "tensor"),  # after heads, mlp, kv, vocab: only where none of them is present
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """`config.mesh` with at most one -1 (fill with the remaining devices) -> three sizes.

    Raises InputError when the mesh does not use exactly `num_devices` devices.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise InputError(None, f"config.mesh must have 3 sizes {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise InputError(None, f"config.mesh {shape}: sizes must be positive, one may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise InputError(
                None, f"config.mesh {shape} does not divide the {num_devices} devices present"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise InputError(
            None,
            f"config.mesh {shape} needs {math.prod(shape)} devices but {num_devices} are present",
        )
    return shape


def make_mesh(
    shape: Sequence[int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch dimension is split (the mesh axes that `batch` maps to)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, microbatches: int, mesh: jax.sharding.Mesh) -> None:
    """Every microbatch must split evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh)
    if microbatches < 1 or batch_size % microbatches:
        raise InputError(
            None,
            f"config.batch_size {batch_size} is not divisible by config.microbatches {microbatches}",
        )
    if (batch_size // microbatches) % dp:
        raise InputError(
            None,
            f"config.batch_size {batch_size} / microbatches {microbatches} is not divisible by the "
            f"{dp} data-parallel devices (mesh data x fsdp)",
        )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding of every batch array: leading (batch) dimension over data and fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh: jax.sharding.Mesh):
    """Abstract params with `nn.LogicallyPartitioned` leaves -> a pytree of NamedShardings.

    The result has the structure of the unboxed params. Leaves without logical names are
    replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when launched as one of several processes.

    Recognised launches: explicit `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` +
    `JAX_PROCESS_ID` (any cluster, local tests), SLURM with more than one task, Open MPI, and
    multi-host Cloud TPU (`TPU_WORKER_HOSTNAMES` with several hosts); JAX detects the rest of the
    parameters itself. A plain single-process run initialises nothing.
    """
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or "OMPI_MCA_orte_hnp_uri" in env
        or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    ):
        jax.distributed.initialize()
