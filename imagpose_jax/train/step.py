"""One jitted training step (spec section 6) on the (graphdef, state) pair of `state.init_train_state`.

Per step, all inside one XLA program (the state is donated), as a composition of the model's own functions:
  `models.encode.encode`:  frozen VAE (whole grid -> posterior-sampled targets and masked grid -> posterior
                           means, in one call; reference -> posterior mean) and frozen DINOv2 (tokens (B, 257, D))
  random draws:            offset noise, uniform timesteps, classifier-free-guidance dropout: per sample, one
                           draw drops the DINOv2 tokens only (p_image), the patch tokens only (p_ref) or both
                           (p_both) to the sampler's null condition (all-zero tokens)
  `loss_and_grads`:        `IMAGPose.condition` -> `Condition.keep` -> `loss.diffusion_loss` (min-SNR-weighted
                           v-prediction MSE through `IMAGPose.denoise`), differentiated for the stage's trainable
                           parameters only; the golden `train_loss` cases run this same function
  clipped AdamW update (`state.make_tx`; skipped when the gradient is not finite); optional EMA of the
  trainable parameters.

Mixed precision: the state holds fp32 master weights; with compute_dtype bfloat16 every model's
parameters are cast to bf16 inside the step (the cast is inside the differentiated function, so
gradients and updates are fp32). Noise, targets and the loss are fp32.

The batch is a `data.batch.Batch` (DINOv2's input CLIP-pre-processed by the data workers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from imagpose_jax.data.batch import Batch, as_batch
from imagpose_jax.models.encode import encode
from imagpose_jax.train.loss import diffusion_loss, sample_noise, sample_timesteps

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MATMUL_PRECISIONS = ("default", "high", "highest")


@dataclass(frozen=True)
class StepConfig:
    noise_offset: float = 0.05
    snr_gamma: float = 5.0
    p_image: float = 0.1          # drop the DINOv2 tokens only
    p_ref: float = 0.0            # drop the patch tokens only
    p_both: float = 0.0           # drop both
    compute_dtype: str = "float32"
    # jax.default_matmul_precision for the whole step. With bf16 compute the model's matmuls have bf16 operands
    # whatever it is; it decides the float32 ones: on TPU "default" runs them as one bf16 pass, "highest" exactly
    # (as the CPU does). Rematerialisation is the model's own setting (`UNetConfig.remat`, per block).
    matmul_precision: str = "highest"
    ema_decay: float = 0.9999     # used when the state has an EMA

    def __post_init__(self):
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {self.compute_dtype!r}")
        if min(self.p_image, self.p_ref, self.p_both) < 0 or self.p_image + self.p_ref + self.p_both > 1:
            raise ValueError(f"dropout probabilities must be >= 0 and sum to <= 1: {self.p_image, self.p_ref, self.p_both}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {self.matmul_precision!r}")


class LossInputs(NamedTuple):
    """What the objective needs once the encoders have run and the random draws are made (NHWC)."""
    image_embeds: jax.Array      # (B, N, D) DINOv2 tokens
    ref_latents: jax.Array       # (B, hr, wr, 4)
    masked_latents: jax.Array    # (B, h, w, 4)
    pose_grid: jax.Array         # (B, f h, f w, 3) in [0, 1]
    known: jax.Array             # (B, 4) bool
    latents: jax.Array           # (B, h, w, 4) clean latents x0
    noise: jax.Array             # (B, h, w, 4), noise offset included
    timesteps: jax.Array         # (B,) int
    keep_image: jax.Array        # (B,) 1 keeps the DINOv2 tokens, 0 drops them
    keep_patch: jax.Array        # (B,) likewise for the patch tokens


def guidance_keep(key: jax.Array, batch: int, cfg: StepConfig) -> tuple[jax.Array, jax.Array]:
    """Per-sample (B,) float32 keep factors for the DINOv2 and the patch tokens (classifier-free-guidance
    dropout): one uniform draw per sample picks 'drop image only' (p_image), 'drop patch only' (p_ref) or
    'drop both' (p_both)."""
    u = jax.random.uniform(key, (batch,))
    a, b, c = cfg.p_image, cfg.p_image + cfg.p_ref, cfg.p_image + cfg.p_ref + cfg.p_both
    drop_image = (u < a) | ((u >= b) & (u < c))
    drop_patch = (u >= a) & (u < c)
    return (~drop_image).astype(jnp.float32), (~drop_patch).astype(jnp.float32)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _cast_module(module: nnx.Module, dtype) -> nnx.Module:
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, _cast(state, dtype))


def loss_and_grads(model: nnx.Module, trainable: nnx.filterlib.Filter, inputs: LossInputs, alphas_cumprod,
                   cfg: StepConfig) -> tuple[jax.Array, dict, nnx.State]:
    """The training objective of `model` (an `IMAGPose`) on `inputs` and its gradient with respect to the
    parameters selected by `trainable` -> (loss, aux {pred, target, weight}, grads (an `nnx.State`))."""
    dtype = DTYPES[cfg.compute_dtype]
    model_def, params, rest = nnx.split(model, trainable, ...)

    def loss_fn(params):
        m = nnx.merge(model_def, _cast(params, dtype), _cast(rest, dtype))
        cond = m.condition(inputs.image_embeds.astype(dtype), inputs.ref_latents.astype(dtype),
                           inputs.masked_latents.astype(dtype), inputs.pose_grid.astype(dtype), known=inputs.known)
        cond = cond.keep(inputs.keep_image, inputs.keep_patch)
        return diffusion_loss(lambda x, t: m.denoise(x.astype(dtype), t, cond), inputs.latents, inputs.noise,
                              inputs.timesteps, alphas_cumprod, cfg.snr_gamma)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, aux, grads


class TrainStep:
    """`TrainStep(graphdef, cfg, alphas_cumprod, learning_rate=...)(state, batch) -> (state, metrics)`; `state` is
    donated. (`train.config.train_step` builds it from a config.)

    `alphas_cumprod` (T,): the training DDPM schedule. `learning_rate`: the optimizer's peak rate, an input of the
    program (not a constant in it: another rate reuses the compiled step). With `shardings` (from
    `init_train_state`) and `batch_sharding` the program is compiled for that layout. Train steps equal in graphdef,
    `cfg`, schedule and layout share one program in this process (`_program`): a second run in the same process (a
    learning-rate sweep, a resumed run, a notebook) neither traces nor compiles again. `traces` counts that program's
    tracings.
    """

    def __init__(self, graphdef: nnx.GraphDef, cfg: StepConfig, alphas_cumprod, *, learning_rate: float,
                 shardings: nnx.State | None = None, batch_sharding: NamedSharding | None = None):
        self.learning_rate = np.float32(learning_rate)
        self._program = _program(graphdef, cfg, np.asarray(alphas_cumprod, np.float32), shardings, batch_sharding)

    @property
    def traces(self) -> int:
        return self._program.traces

    def __call__(self, state: nnx.State, batch: Batch) -> tuple[nnx.State, dict]:
        return self._program.jit(state, as_batch(batch), self.learning_rate)

    def lower(self, state: nnx.State, batch: Batch) -> jax.stages.Lowered:
        """The step lowered for `state` and `batch` as arrays or `jax.ShapeDtypeStruct`s (`state.abstract_train_state`,
        `data.batch.batch_spec`): `.compile()` gives the program `__call__` runs, on devices this host may not have
        (called with the state, the batch and `learning_rate`)."""
        return self._program.jit.lower(state, as_batch(batch), self.learning_rate)


# The process's train-step programs, newest first, by (graphdef, step config, schedule, layout). GraphDefs of equal
# configs are equal (`state.make_tx` gives equal arguments the same optimizer), and nnx.GraphDef is not hashable:
# a short list searched with ==.
_PROGRAMS: list[tuple[tuple, "_Program"]] = []
_KEEP = 4


def _program(graphdef, cfg, alphas_cumprod, shardings, batch_sharding) -> "_Program":
    key = (graphdef, cfg, alphas_cumprod.tobytes(), jax.tree.flatten(shardings), batch_sharding)
    for i, (k, program) in enumerate(_PROGRAMS):
        if k == key:
            _PROGRAMS.insert(0, _PROGRAMS.pop(i))
            return program
    program = _Program(graphdef, cfg, alphas_cumprod, shardings, batch_sharding)
    _PROGRAMS.insert(0, (key, program))
    del _PROGRAMS[_KEEP:]
    return program


class _Program:
    """The jitted step (its state argument donated) for one graphdef, config, schedule and layout."""

    def __init__(self, graphdef, cfg, alphas_cumprod, shardings, batch_sharding):
        self.graphdef, self.cfg, self.alphas_cumprod = graphdef, cfg, alphas_cumprod
        self.traces = 0
        kw = {}
        if shardings is not None:
            scalar = NamedSharding(batch_sharding.mesh, PartitionSpec())
            kw = dict(in_shardings=(shardings, batch_sharding, scalar), out_shardings=(shardings, None))
        self.jit = jax.jit(self._step, donate_argnums=0, **kw)

    def _step(self, state: nnx.State, batch: Batch, learning_rate: jax.Array) -> tuple[nnx.State, dict]:
        self.traces += 1
        with jax.default_matmul_precision(self.cfg.matmul_precision):
            return self._step_body(state, batch, learning_rate)

    def _step_body(self, state: nnx.State, batch: Batch, learning_rate: jax.Array) -> tuple[nnx.State, dict]:
        cfg, dtype = self.cfg, DTYPES[self.cfg.compute_dtype]
        ts = nnx.merge(self.graphdef, state)
        rng, k_post, k_noise, k_t, k_drop = jax.random.split(ts.rng.get_value(), 5)
        enc = encode(_cast_module(ts.vae, dtype), _cast_module(ts.dino, dtype), batch, target_key=k_post, dtype=dtype)
        latents = enc.targets.astype(jnp.float32)                         # (B, h, w, 4)
        b = latents.shape[0]
        keep_image, keep_patch = guidance_keep(k_drop, b, cfg)
        inputs = LossInputs(enc.image_embeds, enc.ref_latents, enc.masked_latents, batch.pose_grid, batch.known,
                            latents, sample_noise(k_noise, latents.shape, cfg.noise_offset),
                            sample_timesteps(k_t, b, len(self.alphas_cumprod)), keep_image, keep_patch)
        loss, _, grads = loss_and_grads(ts.model, ts.trainable, inputs, self.alphas_cumprod, cfg)
        ts.optimizer.update(ts.model, grads, learning_rate=learning_rate)
        if ts.ema is not None:
            new = nnx.to_flat_state(nnx.state(ts.model, ts.trainable))
            for (_, e), (_, p) in zip(nnx.to_flat_state(ts.ema), new, strict=True):
                e.set_value(cfg.ema_decay * e.get_value() + (1.0 - cfg.ema_decay) * p.get_value())
        ts.rng.set_value(rng)
        grad_norm = optax.global_norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "step": ts.optimizer.step.get_value(),
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}   # False: the update was skipped
        return nnx.state(ts), metrics

