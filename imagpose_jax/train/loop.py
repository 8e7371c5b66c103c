"""The training loop (spec section 6): `train(config, workdir)` runs or resumes one stage.

  workdir/config.json        the resolved config
  workdir/checkpoints/<N>/   orbax checkpoints (train state + data-iterator position), newest `train.keep`
  workdir/metrics.jsonl      one line per step: step, loss, grad_norm, steps_per_s (appended; a resumed run
                             rewrites the steps after its checkpoint, so the last line per step counts)
  workdir/tb/                TensorBoard scalars (and sample grids)
  workdir/samples/step_N.png sample grids every `train.sample_every` steps (sources | pose | generated | truth)
  workdir/export/            at the end: denoiser/ (and denoiser_ema/), vae/, image_encoder/ parameter
                             folders, loadable by `IMAGPosePipeline.from_pretrained`

A run killed at any point resumes from its latest complete checkpoint with the same parameters, optimizer
moments, step, RNG key and data position, so its losses continue exactly as an uninterrupted run's.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from imagpose_jax.checkpoint.folder import PipelineFolder, atomic_folder
from imagpose_jax.checkpoint.train_state import TrainCheckpointer
from imagpose_jax.models.init import jit_state
from imagpose_jax.sharding import host_batch_to_global, make_mesh
from imagpose_jax.train import config as tc
from imagpose_jax.train.inputs import sample_examples, train_iterator
from imagpose_jax.train.pretrained import load_pretrained
from imagpose_jax.train.state import abstract_train_state


class MetricWriter:
    """metrics.jsonl and TensorBoard scalars/images, written by process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.tb = None
        if self.enabled:
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                logging.warning("tensorboardX is not installed: no TensorBoard scalars (metrics.jsonl only)")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        strict = {k: v if math.isfinite(v) else None for k, v in values.items()}   # strict JSON: NaN/inf as null
        self.jsonl.write(json.dumps({"step": step, **strict}, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(name, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self.enabled:
            self.jsonl.flush()
            if self.tb is not None:
                self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


class NonFiniteError(RuntimeError):
    """The loss or gradient was not finite for `train.max_nonfinite` steps in a row (those updates were skipped)."""


class Interrupted(RuntimeError):
    """SIGTERM / SIGINT (a preemption, Ctrl-C): the step in flight finished and a checkpoint was saved at `step`."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; a checkpoint of step {step} "
                         f"was saved: the same command resumes from it")
        self.step, self.signum = step, signum


class _StopSignals:
    """While active, SIGTERM and SIGINT only set `received` (the loop stops after the step in flight)."""

    def __init__(self):
        self.received, self._old = 0, {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _preempted(step: int) -> bool:
    """On a multi-host run, whether the cluster's preemption notice reached every host at this step (JAX's
    preemption sync point: all hosts stop at the same step)."""
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:   # no preemption service in this cluster
        return False


def build_state(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, ckpt: TrainCheckpointer,
                iterator) -> tuple[int, nnx.GraphDef, nnx.State, nnx.State]:
    """(start step, graphdef, sharded state, shardings). Resuming, the newest checkpoint that reads back is restored
    straight into the abstract state (no random init: at SD1.5 size that would be a compile and an initialisation
    thrown away); otherwise random init (jitted, sharded), then the pretrained weights."""
    build = tc.state_builder(c)
    graphdef, abstract, shardings = abstract_train_state(build, mesh)
    start, state = ckpt.restore_latest(abstract, shardings, iterator)   # past an unreadable newest checkpoint
    if start:
        logging.info("resumed from step %d", start)
    else:
        state = load_pretrained(jit_state(build, shardings), shardings, c)
    return start, graphdef, state, shardings


def train(c: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          on_step: Callable[[int], None] | None = None) -> dict:
    """Trains `c.steps` steps (resuming from the latest checkpoint in `workdir`); returns a summary.
    `on_step(step)` is called after each step's logging, checkpoint and samples (a hook for callers and tests).

    Raises `NonFiniteError` after `c.train.max_nonfinite` non-finite steps in a row (nothing non-finite is saved or
    exported: a NaN or inf tensor anywhere is `NonFiniteParamsError` at the save), `CorruptImageError` /
    `CorruptDataError` for unreadable data (`data.check_images`, `data.skip_corrupt`), and `Interrupted` on
    SIGTERM / SIGINT once the step in flight is checkpointed."""
    tc.check_run(c)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(c.to_json_best_effort(indent=1))
    mesh = make_mesh(**c.mesh.to_dict())
    t0 = time.perf_counter()
    iterator = train_iterator(c, workdir, mesh, progress=progress)   # every image checked before the models are built
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=c.train.keep,
                             async_save=c.train.async_checkpoint)
    start, graphdef, state, shardings = build_state(c, mesh, ckpt, iterator)
    init_s = time.perf_counter() - t0
    step_fn = tc.train_step(c, graphdef, shardings)
    writer = MetricWriter(workdir)
    samples = SampleWriter(c, graphdef, sample_examples(c, workdir) if c.train.sample_every else [], workdir, writer)
    bar = _progress(progress, start, c.steps)
    pending, last_log, losses = [], time.perf_counter(), []
    first_step_s, nonfinite_run, skipped_nonfinite = None, 0, 0
    with _StopSignals() as signals:
        try:
            for step in range(start + 1, c.steps + 1):
                t_step = time.perf_counter()
                batch = host_batch_to_global(next(iterator), mesh)
                state, metrics = step_fn(state, batch)
                pending.append((step, metrics))
                if first_step_s is None:
                    jax.block_until_ready(metrics["loss"])
                    first_step_s = time.perf_counter() - t_step
                if step % c.train.log_every == 0 or step == c.steps:
                    now = time.perf_counter()
                    rate = len(pending) / max(now - last_log, 1e-9)
                    for s, m in jax.device_get(pending):
                        values = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "steps_per_s": rate}
                        writer.scalars(s, values)
                        losses.append(values["loss"])
                        nonfinite_run = 0 if bool(m["finite"]) else nonfinite_run + 1
                        skipped_nonfinite += not bool(m["finite"])
                        if not bool(m["finite"]):
                            logging.warning("step %d: loss %s, gradient norm %s: not finite, update skipped", s,
                                            values["loss"], values["grad_norm"])
                    writer.flush()
                    if nonfinite_run >= c.train.max_nonfinite:
                        raise NonFiniteError(
                            f"step {step}: the loss or gradient was not finite for {nonfinite_run} steps in a row (updates "
                            f"skipped, parameters unchanged since); last good checkpoint: step {ckpt.latest_step() or 'none'} "
                            f"in {ckpt.directory}. Lower optim.learning_rate, or check the data")
                    pending, last_log = [], now
                    if bar is not None:
                        bar.set_postfix(loss=f"{losses[-1]:.4f}", steps_per_s=f"{rate:.2f}")
                if bar is not None:
                    bar.update(1)
                if step % c.train.checkpoint_every == 0 or step == c.steps:
                    ckpt.save(step, state, iterator)
                if c.train.sample_every and (step % c.train.sample_every == 0 or step == c.steps):
                    samples(state, step)
                if on_step is not None:
                    on_step(step)
                if signals.received or _preempted(step):
                    if not (step % c.train.checkpoint_every == 0 or step == c.steps):
                        ckpt.save(step, state, iterator)
                    ckpt.wait()
                    raise Interrupted(step, signals.received or signal.SIGTERM)
        finally:
            ckpt.close()
            writer.close()
            if bar is not None:
                bar.close()
    export_dir = export(c, graphdef, state, workdir)
    return {"start_step": start, "steps": c.steps, "init_s": round(init_s, 2),
            "first_step_s": None if first_step_s is None else round(first_step_s, 2),
            "final_loss": losses[-1] if losses else None, "export": export_dir,
            "skipped_corrupt": iterator.skipped_corrupt, "skipped_nonfinite": skipped_nonfinite,
            "traces": step_fn.traces, "sample_traces": samples.traces}


def _progress(enabled: bool, start: int, total: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _host(x) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def ema_params(ts) -> nnx.State:
    """The model's parameters with the EMA's values in place of the trained ones (the EMA covers the trainable ones)."""
    flat = dict(nnx.to_flat_state(nnx.state(ts.model, nnx.Param)))
    for p, v in nnx.to_flat_state(ts.ema):
        flat[p] = flat[p].replace(v.get_value())
    return nnx.from_flat_state(list(flat.items()))


def export(c: ml_collections.ConfigDict, graphdef: nnx.GraphDef, state: nnx.State, workdir: str) -> str:
    """Parameter folders for inference: denoiser/ (+ denoiser_ema/), vae/, image_encoder/, written whole into
    workdir/export/ (a rerun replaces its export; an interrupted write leaves the previous one)."""
    from imagpose_jax.checkpoint.params import save_params
    ts = nnx.merge(graphdef, state)
    out = os.path.join(workdir, "export")
    parts = {"denoiser": (tc.model_config(c).to_dict(), nnx.state(ts.model, nnx.Param)),
             "vae": (c.vae.to_dict(), nnx.state(ts.vae, nnx.Param)),
             "image_encoder": (c.dino.to_dict(), nnx.state(ts.dino, nnx.Param))}
    if ts.ema is not None:
        parts["denoiser_ema"] = (parts["denoiser"][0], ema_params(ts))
    writer = atomic_folder(out, overwrite=True) if jax.process_index() == 0 else contextlib.nullcontext()
    with writer as tmp:
        for name, (config, params) in parts.items():
            host = jax.tree.map(_host, params)  # every process takes part (a gather of sharded arrays)
            if tmp is not None:
                save_params(getattr(PipelineFolder(tmp), name), config, host)
    return out


class SampleWriter:
    """Sample grids for fixed held-out examples with the current (EMA if kept) weights, every call after the first
    reusing the first call's compiled sampler (the weights are swapped in, nothing re-traces)."""

    def __init__(self, c, graphdef, examples, workdir, writer):
        self.c, self.graphdef, self.examples, self.workdir, self.writer = c, graphdef, examples, workdir, writer
        self.sampler = None

    @property
    def traces(self) -> int:
        return 0 if self.sampler is None else self.sampler.traces

    def __call__(self, state, step: int) -> None:
        c, examples = self.c, self.examples
        if not examples:
            return
        if jax.process_count() > 1:
            logging.warning("sample grids are written on single-host runs only; skipped at step %d", step)
            return
        from imagpose_jax.data.batch import masked_views, stack
        from imagpose_jax.images import contact_sheet, save_image
        from imagpose_jax.sampling.sampler import Sampler, SamplerConfig
        ts = nnx.merge(self.graphdef, state)
        model = ts.model
        if ts.ema is not None:
            model_def, _, rest = nnx.split(ts.model, nnx.Param, ...)
            model = nnx.merge(model_def, ema_params(ts), rest)
        if self.sampler is None:
            cfg = SamplerConfig(num_inference_steps=c.train.sample_steps, guidance_scale=c.train.sample_guidance,
                                scheduler_config={**SamplerConfig().scheduler_config, **c.noise.to_dict()})
            self.sampler = Sampler(model, ts.vae, ts.dino, cfg)
        else:
            self.sampler.set_weights(model, ts.vae, ts.dino)
        images = self.sampler(stack(examples), key=jax.random.key(c.seed))  # (B, 2H, 2W, 3) in [0, 1]
        sheet = contact_sheet([[(masked_views(e["grid"], e["known"]) + 1) / 2, e["pose_grid"], img, (e["grid"] + 1) / 2]
                               for e, img in zip(examples, images)])
        folder = os.path.join(self.workdir, "samples")
        os.makedirs(folder, exist_ok=True)
        save_image(os.path.join(folder, f"step_{step}.png"), sheet)
        self.writer.image(step, "samples", sheet)
