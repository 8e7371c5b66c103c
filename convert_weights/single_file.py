"""Single-file Stable Diffusion checkpoints (the original LDM layout) -> diffusers-layout state dicts, strictly.

Files read: a whole SD checkpoint (`v1-5-pruned-emaonly.safetensors`, `v1-5-pruned.ckpt`: `model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*`, the non-pruned ones also `model_ema.*`) and a standalone VAE file
(`vae-ft-mse-840000-ema-pruned.safetensors`: bare `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`),
in any format and dtype `load_torch_file` reads. The key mapping is diffusers' own (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, given a local config: nothing is fetched). That mapping skips keys it does not
know without a word, so every value is tagged with its file key on the way through: a file key of the part
being converted that reaches no diffusers key is an error naming it, and the diffusers keys remember their
file key (`origins`) so that the strict `torch_to_nnx` names both.

Every other key of the file is either the other part (the VAE when converting the UNet, and the reverse) or one
of the deliberate skips below; anything else is an error naming the key.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import numpy as np

from convert_weights.core import ConversionError, Skip

log = logging.getLogger(__name__)

# runwayml/stable-diffusion-v1-5 unet/config.json and vae/config.json.
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}

UNET_PREFIX, EMA_PREFIX, VAE_PREFIX = "model.diffusion_model.", "model_ema.", "first_stage_model."
VAE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
EMA_BOOKKEEPING = Skip(r"^model_ema\.(decay|num_updates)$", "the EMA's bookkeeping")
SKIPS = (
    Skip(r"^cond_stage_model\.", "the CLIP text encoder: IMAGPose conditions on image features (DINOv2), not text"),
    Skip(r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
         r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
         r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)$",
         "LDM's noise-schedule buffers: the schedule is the training config's `noise` settings"),
    EMA_BOOKKEEPING,
)
SKIP_VAE = Skip(r"^first_stage_model\.", "the VAE (converted on its own: `--vae FILE`)")
SKIP_UNET = Skip(r"^model(_ema)?\.diffusion_model", "the UNet (converted on its own: `sd15 --single-file FILE`)")
SKIP_VAE_LOSS = Skip(r"^loss\.", "the autoencoder's training loss (LPIPS and discriminator) in LDM VAE checkpoints")


def read_config(config, default: Mapping) -> dict:
    """`config`: None (`default`), a dict, or a diffusers `config.json` (or the folder holding it) -> a dict."""
    if config is None:
        return dict(default)
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: expected a diffusers config.json or the folder holding it")
    with open(path) as f:
        return json.load(f)


def ema_key(key: str) -> str:
    """LDM's EMA copy of a `model.diffusion_model.*` key: the dots after `model` removed (LitEma's naming)."""
    return EMA_PREFIX + "".join(key.split(".")[1:])


def has_ema(sd: Mapping) -> bool:
    return any(k.startswith(EMA_PREFIX) and not EMA_BOOKKEEPING.matches(k) for k in sd)


def ldm_unet(sd: Mapping[str, np.ndarray], config: Mapping, *, ema: bool = True,
             source: str = "checkpoint") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A single-file SD checkpoint's UNet -> (diffusers-layout state dict, {diffusers key: file key}).

    Takes the EMA copy (`model_ema.*`) when the file has one and `ema`, else `model.diffusion_model.*`.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    keys = [k for k in sd if k.startswith(UNET_PREFIX)]
    if not keys:
        raise ConversionError(f"{source}: no UNet weights (no key starts with {UNET_PREFIX!r}): not a single-file "
                              f"SD checkpoint")
    use_ema = ema and has_ema(sd)
    file_key = {k: ema_key(k) if use_ema else k for k in keys}
    if use_ema:
        missing = [f"{v} (the EMA copy of {k})" for k, v in file_key.items() if v not in sd]
        if missing:
            raise ConversionError(f"{source}: incomplete EMA weights, {len(missing)} missing (--no-ema takes the "
                                  f"others): " + "; ".join(missing[:20]))
        log.info("%s: UNet from the EMA weights (model_ema.*); --no-ema takes model.diffusion_model.*", source)
        skip = Skip(r"^model\.diffusion_model\.", "the non-EMA UNet weights (the EMA ones are used)")
    else:
        log.info("%s: UNet from model.diffusion_model.* (%s)", source,
                 "--no-ema: the file's EMA weights model_ema.* are not used" if has_ema(sd) else "the file has no EMA weights")
        skip = Skip(r"^model_ema\.", "the EMA UNet weights (--no-ema)")
    _check_rest(sd, set(file_key.values()), (skip, SKIP_VAE, *SKIPS), source)
    return _convert(lambda d: convert_ldm_unet_checkpoint(d, dict(config)),
                    {k: sd[v] for k, v in file_key.items()}, file_key, "the UNet", source)


def ldm_vae(sd: Mapping[str, np.ndarray], config: Mapping, *,
            source: str = "checkpoint") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A whole SD checkpoint's `first_stage_model.*`, or a standalone VAE file's bare `encoder.*`/`decoder.*`/
    `quant_conv.*`/`post_quant_conv.*` -> (diffusers-layout state dict, {diffusers key: file key})."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    whole = any(k.startswith(VAE_PREFIX) for k in sd)
    prefix = VAE_PREFIX if whole else ""
    keys = [k for k in sd if k.startswith(VAE_PREFIX)] if whole else [k for k in sd if k.startswith(VAE_KEYS)]
    if not keys:
        raise ConversionError(f"{source}: no VAE weights (no key starts with {VAE_PREFIX!r}, nor with "
                              f"{', '.join(VAE_KEYS)} as a standalone VAE file's do)")
    _check_rest(sd, set(keys), (SKIP_UNET, *SKIPS) if whole else (SKIP_VAE_LOSS,), source)
    file_key = {k[len(prefix):]: k for k in keys}
    return _convert(lambda d: convert_ldm_vae_checkpoint(d, dict(config)),
                    {k: sd[v] for k, v in file_key.items()}, file_key, "the VAE", source)


def _check_rest(sd: Mapping, used: set[str], skips, source: str) -> None:
    unexpected = [f"{k} {tuple(np.shape(sd[k]))}" for k in sd if k not in used and not any(s.matches(k) for s in skips)]
    if unexpected:
        raise ConversionError(f"{source}: {len(unexpected)} unexpected key(s): " + "; ".join(unexpected[:20])
                              + (" ..." if len(unexpected) > 20 else ""))


class _Tagged(np.ndarray):
    """An array that carries the file key it came from through diffusers' renames and slices."""

    def __array_finalize__(self, obj):
        self.file_key = getattr(obj, "file_key", None)


def _convert(fn, part: dict[str, np.ndarray], file_key: dict[str, str], what: str,
             source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Runs diffusers' mapping `fn` on `part` (LDM keys as `fn` takes them); every file key must come out."""
    tagged = {}
    for k, v in part.items():
        tagged[k] = t = np.asarray(v).view(_Tagged)
        t.file_key = file_key[k]
    try:
        out = fn(tagged)
    except Exception as e:  # noqa: BLE001 - e.g. a KeyError on a renamed key: re-raised with the file named
        raise ConversionError(f"{source}: diffusers' LDM mapping of {what} failed: {type(e).__name__}: {e}") from e
    origins = {k: getattr(v, "file_key", None) for k, v in out.items() if v is not None}
    unread = sorted(set(file_key.values()) - set(origins.values()))
    if unread:
        raise ConversionError(f"{source}: {len(unread)} key(s) of {what} that diffusers' LDM mapping does "
                              f"not read (renamed, or a model it does not know): " + "; ".join(unread[:20])
                              + (" ..." if len(unread) > 20 else ""))
    return {k: np.asarray(out[k]) for k in origins}, {k: v for k, v in origins.items() if v is not None}
