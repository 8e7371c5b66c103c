"""A quick VAE pre-training for small images (the demo's tiny `AutoencoderKL` on the synthetic dataset).

The denoiser works in the VAE's latent space, so a generator can be no better than the VAE's reconstruction:
with random VAE weights nothing decodes to an image. `train_vae` fits the encoder and decoder on a set of views
(all the training persons' images, random horizontal flips, optionally random crops: the VAE is convolutional,
and crops cost a fraction of whole views for the same number of steps) with L1 + MSE reconstruction, an L1 term
on 8x8-block means (colour over regions, which a short run otherwise learns last) and a small KL term, with
clipped AdamW in one jitted step. The posterior starts narrow (the log-variance half of `quant_conv`'s bias
at `initial_logvar`): with the default initialisation its std is about 1, which in a short run buries the
colours in the sampling noise, and the trainer samples the posterior too. It then sets the config's
`scaling_factor` to 1 / (std of the posterior means) so that the scaled latents have unit variance, as Stable
Diffusion's did.

`save_vae` writes a parameter folder (diffusers-style config.json + params.safetensors) that the trainer reads as
`config.init.vae` and `IMAGPosePipeline.from_pretrained` reads as `vae/`.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from imagpose_jax.models.init import abstract, concrete
from imagpose_jax.models.vae import AutoencoderKL, VAEConfig


def load_views(paths: Sequence[str], height: int, width: int) -> np.ndarray:
    """Images -> (N, H, W, 3) float32 in [-1, 1] (bicubic resize when the size differs)."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.BICUBIC)
            out.append(np.asarray(im, np.float32) / 127.5 - 1.0)
    return np.stack(out)


def _pool(x: jax.Array, k: int) -> jax.Array:
    """(B, H, W, C) -> mean over k x k blocks (B, H/k, W/k, C)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // k, k, w // k, k, c).mean(axis=(2, 4))


def _loss(vae: AutoencoderKL, x: jax.Array, key: jax.Array, kl_weight: float, colour_weight: float):
    mean, logvar = vae.encode(x)
    z = vae.sample_posterior(mean, logvar, key)
    rec = vae.decode(z)
    l1 = jnp.mean(jnp.abs(rec - x))
    mse = jnp.mean((rec - x) ** 2)
    colour = jnp.mean(jnp.abs(_pool(rec, 8) - _pool(x, 8)))  # low-frequency colour, learned last otherwise
    kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
    return l1 + mse + colour_weight * colour + kl_weight * kl, {"l1": l1, "mse": mse, "colour": colour, "kl": kl}


def train_vae(images: np.ndarray, vae_config: dict, *, steps: int = 600, batch_size: int = 16,
              learning_rate: float = 1e-3, kl_weight: float = 1e-6, colour_weight: float = 2.0, initial_logvar: float = -6.0, crop: int = 0,
              seed: int = 0, time_limit_s: float | None = None, log=None) -> tuple[AutoencoderKL, dict, dict]:
    """Trains a VAE of `vae_config` (diffusers-style dict) on `images` (N, H, W, 3) in [-1, 1].

    Stops after `steps` steps or `time_limit_s` seconds (whichever first). Returns (vae, config with the fitted
    `scaling_factor`, summary: steps run, seconds, final losses, the latent std)."""
    cfg = dict(vae_config)
    size = crop or min(images.shape[1:3])
    if crop and (crop > min(images.shape[1:3])):
        raise ValueError(f"crop {crop} is larger than the images {images.shape[1:3]}")
    if size % 8 or images.shape[1] % 8 or images.shape[2] % 8:
        raise ValueError(f"images {images.shape[1:3]} and crop {crop} must be multiples of 8 (the colour term's blocks)")
    vae = concrete(lambda k: AutoencoderKL(VAEConfig.from_dict(cfg), rngs=k), seed=seed)
    bias = vae.quant_conv.bias
    bias.set_value(bias.get_value().at[vae.cfg.latent_channels:].set(initial_logvar))
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_cosine_decay_schedule(learning_rate * 0.1, learning_rate, 20,
                                                                    max(steps, 21), learning_rate * 0.1),
                                 weight_decay=0.0))
    opt = nnx.Optimizer(vae, tx, wrt=nnx.Param)

    @nnx.jit
    def step(vae, opt, x, key):
        (loss, aux), grads = nnx.value_and_grad(_loss, has_aux=True)(vae, x, key, kl_weight, colour_weight)
        opt.update(vae, grads)
        return loss, aux

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    t0, done, aux = time.perf_counter(), 0, {}
    for i in range(steps):
        idx = rng.integers(len(images), size=batch_size)
        x = images[idx]
        flip = rng.random(batch_size) < 0.5
        x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
        if crop:  # random crop x crop windows: convolutional, so the VAE then runs at any size
            ys = rng.integers(0, x.shape[1] - crop + 1, size=batch_size)
            xs = rng.integers(0, x.shape[2] - crop + 1, size=batch_size)
            x = np.stack([im[y:y + crop, x0:x0 + crop] for im, y, x0 in zip(x, ys, xs)])
        key, sub = jax.random.split(key)
        _, aux = step(vae, opt, jnp.asarray(x), sub)
        done = i + 1
        if log is not None and (done % 100 == 0 or done == 1):
            a = jax.device_get(aux)
            log(f"vae step {done}: l1 {float(a['l1']):.4f} mse {float(a['mse']):.4f} ({time.perf_counter() - t0:.0f} s)")
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            break
    seconds = time.perf_counter() - t0
    posterior = [jax.device_get(_encode(vae, jnp.asarray(images[s:s + 64]))) for s in range(0, len(images), 64)]
    means = np.concatenate([m for m, _ in posterior])
    std = float(means.std())
    noise_std = float(np.sqrt(np.mean(np.exp(np.concatenate([lv for _, lv in posterior])))))
    cfg["scaling_factor"] = float(1.0 / max(std, 1e-6))
    scaled = abstract(lambda k: AutoencoderKL(VAEConfig.from_dict(cfg), rngs=k))
    nnx.update(scaled, nnx.state(vae))
    a = {k: float(v) for k, v in jax.device_get(aux).items()}
    return scaled, cfg, {"steps": done, "seconds": round(seconds, 2), "final": a, "latent_std": std,
                         "posterior_noise_std": noise_std, "scaling_factor": cfg["scaling_factor"]}


@nnx.jit
def _encode(vae, x):
    return vae.encode(x)


@nnx.jit
def _reconstruct(vae, x):
    return vae.decode(vae.encode(x)[0])


def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, H, W, 3) in [-1, 1] -> reconstructions through the posterior mean, (N, H, W, 3) in [0, 1]."""
    out = [np.asarray(_reconstruct(vae, jnp.asarray(images[s:s + batch_size])))
           for s in range(0, len(images), batch_size)]
    return np.clip(np.concatenate(out) / 2 + 0.5, 0.0, 1.0)


def save_vae(folder: str, vae: AutoencoderKL, config: dict) -> None:
    from imagpose_jax.checkpoint.params import save_params
    save_params(folder, dict(config), nnx.state(vae, nnx.Param))
