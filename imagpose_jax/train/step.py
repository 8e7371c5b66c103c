"""One jitted training step (spec section 6) on the (graphdef, state) pair of `state.init_train_state`.

Per step, all inside one XLA program (the state is donated):
  frozen VAE:    grid image -> latents sampled from the posterior; masked grid and reference -> posterior means
  frozen DINOv2: reference (host pre-processed, `host_batch`) -> tokens (B, 257, D)
  context = [DINOv2 tokens | patch tokens], with classifier-free-guidance dropout to the sampler's null
            condition (all-zero tokens): per sample, one draw drops the DINOv2 tokens only (p_image),
            the patch tokens only (p_ref) or both (p_both)
  UNet input = concat(noisy latents 4, flag 1, masked latents 4) + pose-guider features
  loss = min-SNR-weighted v-prediction MSE (`loss.py`); gradients for the stage's trainable parameters only;
  clipped AdamW update (`state.make_tx`); optional EMA of the trainable parameters.

Mixed precision: the state holds fp32 master weights; with compute_dtype bfloat16 every model's
parameters are cast to bf16 inside the step (the cast is inside the differentiated function, so
gradients and updates are fp32). Noise, targets and the loss are fp32.

DINOv2's input is prepared on the host with `preprocess.clip_preprocess` (PIL bicubic, exactly CLIP's
processor, as the sampler does) rather than with `jax.image.resize`, whose bicubic differs from PIL's.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from imagpose_jax.models.imagpose import flag_at
from imagpose_jax.preprocess import clip_preprocess
from imagpose_jax.schedulers.common import add_noise, get_velocity, snr
from imagpose_jax.train.loss import min_snr_weight, sample_noise, sample_timesteps, weighted_mse

STEP_KEYS = ("grid_image", "masked_grid", "pose_grid", "flag_grid", "ref_image", "dino_pixels")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class StepConfig:
    noise_offset: float = 0.05
    snr_gamma: float = 5.0
    p_image: float = 0.1          # drop the DINOv2 tokens only
    p_ref: float = 0.0            # drop the patch tokens only
    p_both: float = 0.0           # drop both
    compute_dtype: str = "float32"
    remat: bool = False           # recompute the UNet forward in the backward pass (nnx.remat)
    remat_policy: str | None = None  # a `jax.checkpoint_policies` name; None saves nothing
    ema_decay: float = 0.9999     # used when the state has an EMA

    def __post_init__(self):
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {self.compute_dtype!r}")
        if min(self.p_image, self.p_ref, self.p_both) < 0 or self.p_image + self.p_ref + self.p_both > 1:
            raise ValueError(f"dropout probabilities must be >= 0 and sum to <= 1: {self.p_image, self.p_ref, self.p_both}")
        if self.remat_policy is not None and not hasattr(jax.checkpoint_policies, self.remat_policy):
            raise ValueError(f"unknown jax.checkpoint_policies entry {self.remat_policy!r}")


def host_batch(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A `make_train_iterator` batch -> the step's float32 inputs, with `dino_pixels` (B, 224, 224, 3)
    from `ref_image_uint8` through CLIP's pre-processing."""
    out = {k: np.asarray(batch[k], np.float32) for k in STEP_KEYS if k != "dino_pixels"}
    out["dino_pixels"] = np.stack([clip_preprocess(x) for x in batch["ref_image_uint8"]])
    return out


def guidance_keep(key: jax.Array, batch: int, n_image: int, n_total: int, cfg: StepConfig) -> jax.Array:
    """(B, n_total, 1) float32: 0 on the context tokens dropped for classifier-free guidance, else 1.
    Tokens [0, n_image) are DINOv2's, the rest the patch tokens."""
    u = jax.random.uniform(key, (batch,))
    a, b, c = cfg.p_image, cfg.p_image + cfg.p_ref, cfg.p_image + cfg.p_ref + cfg.p_both
    drop_image = (u < a) | ((u >= b) & (u < c))
    drop_ref = (u >= a) & (u < c)
    is_image = jnp.arange(n_total) < n_image
    keep = jnp.where(is_image[None, :], ~drop_image[:, None], ~drop_ref[:, None])
    return keep.astype(jnp.float32)[..., None]


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _cast_module(module: nnx.Module, dtype) -> nnx.Module:
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, _cast(state, dtype))


class TrainStep:
    """`TrainStep(graphdef, cfg, alphas_cumprod)(state, batch) -> (state, metrics)`; `state` is donated.

    `alphas_cumprod` (T,): the training DDPM schedule. With `shardings` (from `init_train_state`) and
    `batch_sharding` the program is compiled for that layout. `traces` counts compilations.
    """

    def __init__(self, graphdef: nnx.GraphDef, cfg: StepConfig, alphas_cumprod, *,
                 shardings: nnx.State | None = None, batch_sharding: NamedSharding | None = None):
        self.graphdef, self.cfg = graphdef, cfg
        self.alphas_cumprod = np.asarray(alphas_cumprod, np.float32)
        self.traces = 0
        kw = {}
        if shardings is not None:
            kw = dict(in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
        self._jit = jax.jit(self._step, donate_argnums=0, **kw)

    def __call__(self, state: nnx.State, batch: Mapping[str, jax.Array]) -> tuple[nnx.State, dict]:
        return self._jit(state, dict(batch))

    def _step(self, state: nnx.State, batch: dict) -> tuple[nnx.State, dict]:
        self.traces += 1
        cfg, dtype = self.cfg, DTYPES[self.cfg.compute_dtype]
        ts = nnx.merge(self.graphdef, state)
        rng, k_post, k_noise, k_t, k_drop = jax.random.split(ts.rng.get_value(), 5)
        vae, dino = _cast_module(ts.vae, dtype), _cast_module(ts.dino, dtype)

        latents = vae.encode_latents(batch["grid_image"].astype(dtype), key=k_post).astype(jnp.float32)  # (B, h, w, 4)
        masked = vae.encode_latents(batch["masked_grid"].astype(dtype))   # (B, h, w, 4) posterior mean
        ref = vae.encode_latents(batch["ref_image"].astype(dtype))        # (B, H/8, W/8, 4) posterior mean
        tokens = dino(batch["dino_pixels"].astype(dtype))                 # (B, 257, D)

        b = latents.shape[0]
        noise = sample_noise(k_noise, latents.shape, cfg.noise_offset)
        t = sample_timesteps(k_t, b, len(self.alphas_cumprod))
        ac = jnp.asarray(self.alphas_cumprod)
        noisy, target = add_noise(ac, latents, noise, t), get_velocity(ac, latents, noise, t)  # (B, h, w, 4)
        weight = min_snr_weight(snr(ac, t), cfg.snr_gamma)                # (B,)
        flag = flag_at(batch["flag_grid"], latents.shape[1:3]).astype(dtype)  # (B, h, w, 1)
        unet_in = jnp.concatenate([noisy.astype(dtype), flag, masked], axis=-1)
        pose_grid = batch["pose_grid"].astype(dtype)                      # (B, 2H, 2W, 3)

        model_def, params, rest = nnx.split(ts.model, ts.trainable, ...)
        run_unet = nnx.remat(_unet_call, policy=_policy(cfg.remat_policy)) if cfg.remat else _unet_call

        def loss_fn(params):
            model = nnx.merge(model_def, _cast(params, dtype), _cast(rest, dtype))
            context = model.context(tokens, ref)                          # (B, 257 + P, D)
            context = context * guidance_keep(k_drop, b, tokens.shape[1], context.shape[1], cfg).astype(dtype)
            pred = run_unet(model.unet, unet_in, t, context, model.pose_features(pose_grid, latents.shape[1:3]))
            return weighted_mse(pred, target, weight)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        ts.optimizer.update(ts.model, grads)
        if ts.ema is not None:
            new = nnx.to_flat_state(nnx.state(ts.model, ts.trainable))
            for (_, e), (_, p) in zip(nnx.to_flat_state(ts.ema), new, strict=True):
                e.set_value(cfg.ema_decay * e.get_value() + (1.0 - cfg.ema_decay) * p.get_value())
        ts.rng.set_value(rng)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "step": ts.optimizer.step.get_value()}
        return nnx.state(ts), metrics


def _unet_call(unet: nnx.Module, sample, t, context, pose):
    return unet(sample, t, context, pose)


def _policy(name: str | None):
    return None if name is None else getattr(jax.checkpoint_policies, name)
