"""Training checkpoints with orbax: the whole train state (sharded arrays) plus each host's data-iterator state.

Layout under `directory/<step>/`:
  state/  the `TrainState`'s `nnx.State` as a pure dict (orbax's standard PyTree format; typed PRNG keys
          stored as their uint32 key data)
  data/   one JSON per process (grain's checkpoint handler): the iterator position, so a resumed run reads
          exactly the batches an uninterrupted one would
Saves are asynchronous (the train loop goes on while arrays are written), keep the newest `keep`, and are
atomic (orbax writes a temporary folder and renames it when complete: a run killed mid-save leaves the last
complete step as the latest).

Faults: `restore_latest` falls back past an unreadable newest checkpoint (truncated or zeroed files) to the newest
one that reads back, with one warning, and moves the damaged step aside to `<step>.corrupt` (kept, no longer
listed); a save that fails (a full disk) raises one `CheckpointError` naming the step and removes orbax's
temporary folder; a state holding a NaN or inf is never saved (`NonFiniteParamsError` naming the tensor).

Restoring takes an abstract target whose leaves carry shardings (`jax.ShapeDtypeStruct(..., sharding=...)`),
so a checkpoint written on one mesh restores onto another (a different device count or layout).
`restore_params` reads only the model's (or the EMA's) parameters, for inference or a next stage.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from imagpose_jax.checkpoint.finite import check_finite
from imagpose_jax.checkpoint.params import flat_values
from imagpose_jax.errors import first_line

STATE, DATA = "state", "data"
CORRUPT = ".corrupt"  # a damaged step's folder is renamed <step>.corrupt


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read back; the message names the folder and step."""


class _NoOrbaxTracebacks(logging.Filter):
    """orbax logs a failed background save once per thread involved, each at ERROR with a full traceback (300 lines
    for one full disk); keep its one-line messages and drop the tracebacks: the CheckpointError raised says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
            record.exc_info = record.exc_text = None
        return True


_NO_ORBAX_TRACEBACKS = _NoOrbaxTracebacks()


# orbax writes an array that is replicated over R devices (the state on a data x fsdp mesh: R = data) in R slices,
# one per replica, each first cut out on the devices; for a model's many small tensors (biases, norms) that is
# thousands of small device programs for writes of a few KiB (tiny stage 3 on 8 CPU devices: 31 s of a 34 s save).
# An array whose per-replica slice would be smaller than this is written whole by one replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The state item's handler: orbax's own, its arrays split over replicas only past `MIN_REPLICA_SLICE_BYTES`."""
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)),
        (np.ndarray, th.NumpyHandler()), *((t, th.ScalarHandler()) for t in (int, float, bytes, np.number)),
        (str, th.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


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
        self._pending, self._failed = None, False  # the last save started; whether a save failed
        if _NO_ORBAX_TRACEBACKS not in logging.getLogger("absl").filters:  # orbax logs through absl's logger
            logging.getLogger("absl").addFilter(_NO_ORBAX_TRACEBACKS)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: _state_handler(), DATA: grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    @contextlib.contextmanager
    def _saving(self, step: int | None):
        """A failed save of `step` -> one CheckpointError naming it, after removing orbax's temporary folders."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise plain Exceptions
            self._failed = True
            logging.debug("checkpoint save failed", exc_info=err)
            with contextlib.suppress(Exception):
                self.manager.close()  # lets orbax's threads still writing the failed step finish
            self._remove_tmp()
            steps = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
            raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed ({first_line(err)}); "
                                  f"the newest complete checkpoint is step {steps[-1] if steps else None}") from None

    def _remove_tmp(self, settle_s: float = 0.0) -> None:
        """Removes orbax's temporary folders (`<step>.orbax-checkpoint-tmp*`) of a failed save; with `settle_s`, again
        until none has reappeared for that long (for at most 10 s): writes of the failed save still in flight in
        tensorstore's own threads, which outlive `manager.close()`, may create one anew (seen on a loaded machine)."""
        if jax.process_index() != 0:
            return
        pattern = os.path.join(glob.escape(self.directory), "*.orbax-checkpoint-tmp*")
        deadline, quiet_since = time.monotonic() + 10.0, time.monotonic()
        while True:
            found = glob.glob(pattern)
            for tmp in found:
                shutil.rmtree(tmp, ignore_errors=True)
            now = time.monotonic()
            if found:
                quiet_since = now
            if now - quiet_since >= settle_s or now > deadline:
                return
            time.sleep(0.05)

    def save(self, step: int, state: nnx.State, iterator: grain.DatasetIterator | None = None, *,
             force: bool = False) -> bool:
        """Starts saving `state` (and the iterator's position) as `step`; returns whether a save started.
        Raises CheckpointError if this save, or the previous (asynchronous) one, failed, and NonFiniteParamsError
        (nothing saved) if a tensor of `state` holds NaN or inf."""
        check_finite(flat_values(state), f"checkpoint step {step} not saved to {self.directory}")
        items = {STATE: ocp.args.PyTreeSave(to_savable(state.to_pure_dict()))}
        if iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(iterator)
        self.wait()  # the previous save (orbax waits for it anyway)
        with self._saving(step):
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        self._pending = step if started else None
        return started

    def restore(self, step: int | None, state_like: nnx.State, shardings: nnx.State,
                iterator: grain.DatasetIterator | None = None) -> nnx.State:
        """The state saved at `step` (default: the latest), placed by `shardings`; `iterator` is moved to the
        saved position in place. `state_like` (abstract or concrete) gives the structure."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = abstract_with_shardings(state_like, shardings)
        savable = abstract_savable(target)
        items = {STATE: ocp.args.PyTreeRestore(savable, restore_args=ocp.checkpoint_utils.construct_restore_args(savable))}
        if iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        pure = from_savable(restored[STATE], target)
        out = jax.tree.map(lambda x: x, state_like)  # a copy to fill
        nnx.replace_by_pure_dict(out, pure)
        return out

    def restore_latest(self, state_like: nnx.State, shardings: nnx.State,
                       iterator: grain.DatasetIterator | None = None) -> tuple[int, nnx.State]:
        """(step, state) of the newest checkpoint that reads back; (0, `state_like`) when there is none.

        Unreadable newer steps are skipped with one warning naming them and renamed to `<step>.corrupt` (kept
        for inspection, no longer listed). If no step reads back (e.g. every one was written by another model
        config), a CheckpointError lists each step's error and nothing is renamed.
        """
        failed = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state = self.restore(step, state_like, shardings, iterator)
            except Exception as err:  # noqa: BLE001 - a damaged checkpoint raises anything (tensorstore, json, ...)
                logging.debug("checkpoint step %d unreadable", step, exc_info=err)
                failed.append((step, err))
                continue
            if failed:
                aside = self._set_aside([s for s, _ in failed])
                logging.warning("unreadable checkpoint in %s: %s; resuming from step %d (kept aside as %s)",
                                self.directory, "; ".join(f"step {s}: {first_line(e)}" for s, e in failed), step,
                                ", ".join(aside))
            return step, state
        if failed:
            raise CheckpointError(f"no checkpoint in {self.directory} reads back: " +
                                  "; ".join(f"step {s}: {first_line(e)}" for s, e in failed))
        return 0, state_like

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Renames each step's folder to `<step>.corrupt` (or `<step>.corrupt-N`); the new names."""
        names = []
        for step in steps:
            src = os.path.join(self.directory, str(step))
            dst, n = src + CORRUPT, 1
            while os.path.lexists(dst):
                dst, n = f"{src}{CORRUPT}-{n}", n + 1
            names.append(os.path.basename(dst))
            if jax.process_index() == 0 and os.path.isdir(src):
                os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("imagpose-checkpoint-set-aside")
        self.manager.reload()
        return names

    def wait(self) -> None:
        """Waits for the save in flight; CheckpointError if it failed."""
        with self._saving(self._pending):
            self.manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """`wait()`, then closes (quietly after a failed save, already reported)."""
        try:
            if not self._failed:
                self.wait()
        finally:
            if self._failed:
                with contextlib.suppress(Exception):
                    self.manager.close()
                self._remove_tmp(settle_s=1.0)  # again: a thread of the failed save may outlive the first removal
            else:
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
