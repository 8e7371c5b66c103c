"""The device mesh: named axes 'data' (pure data parallel), 'fsdp' (data parallel with parameters and
optimizer state sharded) and optionally 'tensor'; batches are split over ('data', 'fsdp')."""
from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp'[, 'tensor']) mesh over `devices` (default: all); `data=-1` takes the devices left over.

    The 'tensor' axis exists only when tensor > 1. Axis types are `Auto`: the partition rules place the
    state, XLA's SPMD partitioner propagates shardings through the step.
    """
    devices = jax.devices() if devices is None else list(devices)
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices do not divide into fsdp={fsdp} x tensor={tensor}")
        data = len(devices) // (fsdp * tensor)
    shape, names = (data, fsdp) + ((tensor,) if tensor > 1 else ()), BATCH_AXES + (("tensor",) if tensor > 1 else ())
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh {dict(zip(names, shape))} needs {data * fsdp * tensor} devices, have {len(devices)}")
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp'), everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))
