"""Training checkpoints with orbax: the whole train state (sharded arrays) plus each host's data-iterator state.

Layout under `directory/<step>/`:
  state/  the `TrainState`'s `nnx.State` as a pure dict (orbax's standard PyTree format; typed PRNG keys
          stored as their uint32 key data)
  data/   one JSON per process (grain's checkpoint handler): the iterator position, so a resumed run reads
          exactly the batches an uninterrupted one would
Saves are asynchronous (the train loop goes on while arrays are written), keep the newest `keep`, and are
atomic (orbax writes a temporary folder and renames it when complete: a run killed mid-save leaves the last
complete step as the latest).

Restoring takes an abstract target whose leaves carry shardings (`jax.ShapeDtypeStruct(..., sharding=...)`),
so a checkpoint written on one mesh restores onto another (a different device count or layout).
`restore_params` reads only the model's (or the EMA's) parameters, for inference or a next stage.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

STATE, DATA = "state", "data"


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_savable(pure: Any) -> Any:
    """PRNG key arrays -> their uint32 key data (orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, pure)


def abstract_savable(abstract: Any) -> Any:
    """An abstract pure-dict target (ShapeDtypeStructs with shardings) with keys replaced by their key data."""
    def one(x):
        if not _is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, abstract)


def from_savable(restored: Any, like: Any) -> Any:
    """Inverse of `to_savable`, using `like` (abstract or concrete) to know which leaves were keys."""
    def one(x, ref):
        if not _is_key(ref):
            return x
        impl = jax.random.key_impl(ref) if isinstance(ref, jax.Array) else ref.dtype._impl  # abstract: its dtype's
        return jax.random.wrap_key_data(x, impl=impl)
    return jax.tree.map(one, restored, like)


def _with_shardings(pure: Any, pure_shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure, pure_shardings)


def abstract_with_shardings(state: nnx.State, shardings: nnx.State) -> dict:
    """The pure-dict restore target: every leaf a ShapeDtypeStruct carrying its target sharding."""
    return _with_shardings(state.to_pure_dict(), shardings.to_pure_dict())


class TrainCheckpointer:
    """`CheckpointManager` over (train state, data iterator). `save` is asynchronous; call `wait()` (or `close()`)
    before reading a checkpoint back or exiting."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: nnx.State, iterator: grain.DatasetIterator | None = None, *,
             force: bool = False) -> bool:
        """Starts saving `state` (and the iterator's position) as `step`; returns whether a save started."""
        items = {STATE: ocp.args.StandardSave(to_savable(state.to_pure_dict()))}
        if iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None, state_like: nnx.State, shardings: nnx.State,
                iterator: grain.DatasetIterator | None = None) -> nnx.State:
        """The state saved at `step` (default: the latest), placed by `shardings`; `iterator` is moved to the
        saved position in place. `state_like` (abstract or concrete) gives the structure."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = abstract_with_shardings(state_like, shardings)
        items = {STATE: ocp.args.StandardRestore(abstract_savable(target))}
        if iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        pure = from_savable(restored[STATE], target)
        out = jax.tree.map(lambda x: x, state_like)  # a copy to fill
        nnx.replace_by_pure_dict(out, pure)
        return out

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: str | os.PathLike, abstract_params: nnx.State, *, step: int | None = None,
                   which: str = "model", shardings: nnx.State | None = None) -> nnx.State:
    """Only the parameters from a training checkpoint: `which` is "model" (the trained weights) or "ema".

    `abstract_params` is `nnx.state(abstract_model, nnx.Param)` (e.g. from `models.init.abstract`); the
    result has its structure, placed by `shardings` (default: one device). Nothing else is read.
    """
    manager = ocp.CheckpointManager(os.path.abspath(os.fspath(directory)),
                                    item_handlers={STATE: ocp.PyTreeCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    pure = abstract_params.to_pure_dict()
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sh = jax.tree.map(lambda _: device, pure)
    else:
        sh = shardings.to_pure_dict()
    target = {which: _with_shardings(pure, sh)}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)}))[STATE]
    except (KeyError, ValueError) as err:
        raise ValueError(f"checkpoint {directory} step {step} has no matching {which!r} parameters: {err}") from err
    finally:
        manager.close()
    out = jax.tree.map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(out, restored[which])
    _check_restored(out, abstract_params, f"{directory} step {step} ({which})")
    return out


def _check_restored(out: nnx.State, abstract: nnx.State, label: str) -> None:
    for (path, got), (_, want) in zip(nnx.to_flat_state(out), nnx.to_flat_state(abstract), strict=True):
        value = got.get_value() if hasattr(got, "get_value") else got
        if isinstance(value, jax.ShapeDtypeStruct) or not hasattr(value, "shape"):
            raise ValueError(f"{label}: parameter {'.'.join(map(str, path))} was not restored")
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"{label}: {'.'.join(map(str, path))} has shape {value.shape}, model {want.shape}")


def np_tree(tree: Any) -> Any:
    """Host copies of a pytree's arrays (for comparing states in tests and tools)."""
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x), tree)
