"""The device mesh and the one table that maps logical axis names to mesh axes.

Every parameter and every activation at a module boundary is annotated with logical names
(`nn.with_logical_partitioning`, `nn.with_logical_constraint`); this file alone decides where
they live on the mesh `('data', 'fsdp', 'tensor')`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

MESH_AXES = ("data", "fsdp", "tensor")

# Flax takes, for each logical axis, the first rule whose mesh axes are not yet used by an earlier
# dimension of the same array. That is why `embed` shards over `fsdp` for parameters but falls back
# to replicated for activations, whose batch dimension already took `fsdp`.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("snippets", None),
    ("tokens", None),
    ("kv_tokens", None),
    ("layers", None),
    ("patch", None),
    ("memory", None),
)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces the one `-1` in `mesh_shape` by what fills `num_devices`."""
    shape = list(mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape may hold at most one -1, got {shape}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh_shape entries must be positive or -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh_shape {shape} cannot fill {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh_shape {shape} needs {math.prod(shape)} devices, have {num_devices}")
    return tuple(shape)


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all) with axes ('data', 'fsdp', 'tensor').

    Axis types are Auto: under Explicit axes (the `jax.make_mesh` default) logical constraints fail.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    return jax.sharding.Mesh(
        np.asarray(devices).reshape(shape),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def logical_sharding(logical_spec_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a tree of logical PartitionSpecs (e.g. `nn.get_partition_spec(...)`)."""
    return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, rules)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> jax.sharding.NamedSharding:
    """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), LOGICAL_AXIS_RULES)
    return jax.sharding.NamedSharding(mesh, spec)


def batch_blocks_spanning_processes(process_grid: np.ndarray) -> dict[int, list[int]]:
    """Batch blocks (one per data x fsdp position, in row order) whose devices belong to more than
    one process -> those processes. `process_grid`: each mesh device's process, `[data, fsdp, tensor]`."""
    blocks = [sorted(set(row.tolist())) for row in np.asarray(process_grid).reshape(-1, process_grid.shape[-1])]
    return {i: processes for i, processes in enumerate(blocks) if len(processes) > 1}


@functools.cache
def check_batch_split(mesh: jax.sharding.Mesh) -> None:
    """Raises unless every block of the batch lives on one process's devices.

    Each process feeds its own rows (`jax.make_array_from_process_local_data`). A block held by
    two processes would take both hosts' different rows as one replicated block, silently: the
    global batch shrinks and the "replicas" differ. That happens when a `tensor` group spans hosts.
    """
    shared = batch_blocks_spanning_processes(np.vectorize(lambda d: d.process_index)(mesh.devices))
    if shared:
        block, processes = next(iter(shared.items()))
        raise ValueError(
            f"mesh {dict(mesh.shape)}: batch block {block} (of data x fsdp = "
            f"{mesh.shape['data'] * mesh.shape['fsdp']}) lives on devices of processes {processes}, but each "
            f"process reads its own rows: every tensor group must sit on one host "
            f"({jax.local_device_count()} devices here), so make config.mesh_shape's tensor axis at most that "
            f"and a divisor of it")


def gather_json(value) -> list:
    """Every process's JSON-able `value`, in process order (`[value]` with one process): bytes
    through an all-gather, padded to the longest. Every process must call it."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(every[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]
