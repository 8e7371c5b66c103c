"""The device mesh: named axes 'data' (pure data parallel), 'fsdp' (data parallel with parameters and
optimizer state sharded) and optionally 'tensor'; batches are split over ('data', 'fsdp')."""
from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp'[, 'tensor']) mesh over `devices` (default: all); `data=-1` or `fsdp=-1` (one of them)
    takes the devices left over.

    The 'tensor' axis exists only when tensor > 1. Axis types are `Auto`: the partition rules place the
    state, XLA's SPMD partitioner propagates shardings through the step.
    """
    devices = jax.devices() if devices is None else list(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: data and fsdp cannot both be -1 (the devices left over go to one of them)")
    if -1 in (data, fsdp):
        fixed = (fsdp if data == -1 else data) * tensor
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices do not divide into {'fsdp' if data == -1 else 'data'}="
                             f"{fixed // tensor} x tensor={tensor}")
        data, fsdp = (len(devices) // fixed, fsdp) if data == -1 else (data, len(devices) // fixed)
    shape, names = (data, fsdp) + ((tensor,) if tensor > 1 else ()), BATCH_AXES + (("tensor",) if tensor > 1 else ())
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh {dict(zip(names, shape))} needs {data * fsdp * tensor} devices, have {len(devices)}")
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp'), everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_split(mesh, batch: int) -> tuple[str, ...]:
    """The batch axes ('data', 'fsdp') of `mesh` that split a batch of `batch`, as many as divide it in turn."""
    axes, n = [], 1
    for a in BATCH_AXES:
        if a in mesh.axis_names and batch % (n * mesh.shape[a]) == 0:
            axes.append(a)
            n *= mesh.shape[a]
    return tuple(axes)


def constrain_batch(x: jax.Array, mesh) -> jax.Array:
    """`x` (B, ...) pinned to batch-split, everything else replicated, on `mesh` (the traced program's abstract
    mesh; no-op for None, one device or inside a `shard_map`): activations between blocks stay split over the
    batch axes instead of following the FSDP-sharded weights' channels (which would hold the whole global batch on
    every chip)."""
    if mesh is None or mesh.size == 1 or mesh.are_all_axes_manual:
        return x
    axes = batch_split(mesh, x.shape[0])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axes or None)))
