"""The sampler: VAE encoding, DINOv2 tokens, the whole denoising loop with classifier-free guidance and the
VAE decode, as one jitted XLA program (spec section 7). Compiled once per input shape.

Input: a `data.batch.Batch` (see there; built with `data.batch.make_example`). The program is a composition of
the model's own functions: `models.encode.encode` -> `IMAGPose.condition` -> (with guidance, [null | cond]
stacked) `IMAGPose.denoise` at every step -> the VAE decode.

Precision: the models compute in their own dtype (`models.layers`: float32, or bfloat16 / float16 when loaded so,
e.g. `IMAGPosePipeline.from_pretrained(..., dtype="bfloat16")`). The latents carried from step to step, the
guidance combination and the scheduler's arithmetic are float32 whatever it is: each step casts the latents to
the denoiser's dtype for the UNet and its prediction back to float32. Images come back float32.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from imagpose_jax.data.batch import Batch, as_batch
from imagpose_jax.data.grid import view_multiple
from imagpose_jax.models.encode import encode
from imagpose_jax.models.layers import weight_dtype
from imagpose_jax.schedulers import make_scheduler
from imagpose_jax.schedulers.common import NOISE_SCHEDULE

DEFAULT_SCHEDULER = {**NOISE_SCHEDULE, "timestep_spacing": "trailing", "steps_offset": 1, "clip_sample": False,
                     "eta": 0.0}


@dataclass(frozen=True)
class SamplerConfig:
    num_inference_steps: int = 30
    guidance_scale: float = 2.0          # out = uncond + g (cond - uncond); no guidance when g <= 1
    scheduler: str = "ddim"              # a name in imagpose_jax.schedulers.SCHEDULERS: "ddim" or "dpmsolver++"
    # diffusers-style keys. The default suits both samplers: "dpmsolver++" accepts DDIM's `eta` / `clip_sample` at
    # their neutral values (0, False) and errors otherwise; its own keys (solver_order, ...) default as in diffusers
    scheduler_config: Mapping = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    patch_reference: str = "view"        # "view": the reference at view size (as trained); "grid": resized to 2Hx2W
    dino_squash: bool = False            # squash the reference to 224x224 before CLIP's pre-processing

    def __post_init__(self):
        if self.patch_reference not in ("view", "grid"):
            raise ValueError(f"patch_reference must be 'view' or 'grid', got {self.patch_reference!r}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 or less: no guidance), "
                             f"got {self.guidance_scale}")

    @classmethod
    def original_inference(cls, **kw) -> SamplerConfig:
        """Reproduces the original's inference exactly (spec section 8): patch tokens from the reference resized
        to the whole grid, the reference squashed to 224x224 for DINOv2, 'linear' betas."""
        return cls(patch_reference="grid", dino_squash=True,
                   scheduler_config={**DEFAULT_SCHEDULER, "beta_schedule": "linear"}, **kw)

    def replace(self, **kw) -> SamplerConfig:
        return dataclasses.replace(self, **kw)


class Sampler:
    """`Sampler(model, vae, dino, cfg)(batch, noise=... or key=...)` -> images (B, 2H, 2W, 3) in [0, 1].

    With several local devices (or on `mesh`, e.g. of a TPU topology's devices for `lower`) the batch is split
    over them (data parallel) and the weights replicated. The sampler holds the modules' (graphdef, state) split:
    it never writes into the modules it was given; abstract modules (`nnx.eval_shape`) serve for `lower`.
    """

    def __init__(self, model, vae, dino, cfg: SamplerConfig = SamplerConfig(), *, mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg
        self.scheduler = make_scheduler(cfg.scheduler, cfg.scheduler_config, cfg.num_inference_steps)
        self.vae_cfg = vae.cfg
        self.dtype = weight_dtype(model)    # the denoiser's compute dtype (its weights')
        self.view_multiple = view_multiple(model.unet.grid_multiple, vae.cfg.downscale_factor)  # pixels a view side
        self.traces = 0  # how many times the program was traced (compiled): once per input shape
        self.mesh = mesh
        if mesh is None and jax.local_device_count() > 1:
            self.mesh = jax.make_mesh((jax.local_device_count(),), ("data",), devices=jax.local_devices(),
                                      axis_types=(jax.sharding.AxisType.Auto,))
        self._graphdef, self._state = nnx.split(nnx.List([model, vae, dino]))
        self.set_weights(model, vae, dino)
        self._run = jax.jit(self._program)

    def set_weights(self, model, vae, dino) -> None:
        """Uses the weights of modules like the sampler's own (same classes and configs: a training run's
        current state) without re-tracing: the compiled program is reused. The modules are only read."""
        graphdef, state = nnx.split(nnx.List([model, vae, dino]))
        if graphdef != self._graphdef:
            raise ValueError("set_weights needs modules of the sampler's own classes and configs")
        if self.mesh is not None and not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
            state = jax.device_put(state, NamedSharding(self.mesh, P()))
        self._state = state

    def lower(self, batch: Batch, noise) -> jax.stages.Lowered:
        """The program lowered for `batch` and `noise` (arrays or `jax.ShapeDtypeStruct`s, with shardings on
        `self.mesh` for a sharded batch) and the weights the sampler holds (replicated on the mesh): `.compile()`
        gives the program `__call__` runs, also for devices this host does not have (`train.aot`)."""
        rep = NamedSharding(self.mesh, P()) if self.mesh is not None else None
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), self._state)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        key = jax.eval_shape(lambda: jax.random.key(0))
        return self._run.lower(state, as_batch(batch), noise, scalar, jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep))

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The latents (h, w, C) of a (height, width) grid under this sampler's VAE."""
        vcfg = self.vae_cfg
        f = vcfg.downscale_factor
        if height % f or width % f:
            raise ValueError(f"grid {height}x{width} is not a multiple of the VAE's downscale factor {f}")
        return height // f, width // f, vcfg.latent_channels

    def _program(self, state: nnx.State, batch: Batch, noise: jax.Array, guidance: jax.Array, key: jax.Array) -> jax.Array:
        self.traces += 1
        model, vae, dino = nnx.merge(self._graphdef, state)
        sched, do_cfg = self.scheduler, self.cfg.guidance_scale > 1.0
        enc = encode(vae, dino, batch)
        cond = model.condition(enc.image_embeds, enc.ref_latents, enc.masked_latents, batch.pose_grid,
                               known=batch.known)    # pose features once for all steps
        if do_cfg:  # [uncond | cond] in one batch
            cond = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), cond.null(), cond)
        timesteps = jnp.asarray(sched.timesteps)

        def body(i, carry):
            latents, solver, k = carry
            k, sub = jax.random.split(k)
            x = latents.astype(self.dtype)
            x = jnp.concatenate([x, x], 0) if do_cfg else x
            out = model.denoise(x, timesteps[i], cond).astype(jnp.float32)
            if do_cfg:
                uncond, c = jnp.split(out, 2)
                out = uncond + guidance * (c - uncond)
            latents, solver = sched.step(solver, out, i, latents, sub)
            return latents, solver, k

        latents = noise * sched.init_noise_sigma
        latents, _, _ = jax.lax.fori_loop(0, len(sched.timesteps), body, (latents, sched.init_solver_state(latents), key))
        return jnp.clip(vae.decode_latents(latents).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    def __call__(self, batch: Batch, noise: np.ndarray | None = None, key: jax.Array | None = None) -> np.ndarray:
        """noise (B, 2H/f, 2W/f, C) (f, C: the VAE's downscale factor and latent channels; SD's 8 and 4), or `key`
        to draw it. Returns float32 images (B, 2H, 2W, 3) in [0, 1]."""
        b, args = self._inputs(batch, noise, key)
        return np.asarray(self._run(*args))[:b]

    def trace(self, batch: Batch, noise: np.ndarray | None = None, key: jax.Array | None = None) -> jax.stages.Traced:
        """The program `__call__` runs on these inputs, traced, not compiled (its `.jaxpr`, `.lower()`): to inspect
        it, e.g. the dtypes its matmuls and convolutions run in."""
        return self._run.trace(*self._inputs(batch, noise, key)[1])

    def _inputs(self, batch, noise, key) -> tuple[int, tuple]:
        """(batch size before padding, the program's arguments)."""
        batch = as_batch(batch)
        batch = Batch(*(jnp.asarray(x, bool if f == "known" else jnp.float32) for f, x in zip(Batch._fields, batch)))
        b, hh, ww, _ = batch.grid.shape
        key = jax.random.key(0) if key is None else key
        shape = (b, *self.latent_shape(hh, ww))
        if noise is None:
            key, sub = jax.random.split(key)
            noise = jax.random.normal(sub, shape, jnp.float32)
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != shape:
            raise ValueError(f"noise has shape {noise.shape}; expected {shape}")
        if self.mesh is not None:
            pad = (-b) % self.mesh.size
            if pad:
                batch = Batch(*(jnp.concatenate([x, jnp.repeat(x[-1:], pad, 0)]) for x in batch))
                noise = jnp.concatenate([noise, jnp.repeat(noise[-1:], pad, 0)])
            batch, noise = jax.device_put((batch, noise), NamedSharding(self.mesh, P("data")))
        return b, (self._state, batch, noise, jnp.float32(self.cfg.guidance_scale), key)
