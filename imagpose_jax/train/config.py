"""The training configuration shared by `configs/stage{1,2,3}.py` (ml-collections), and the objects built
from it. Variants: "full" (the original's settings, spec section 6: SD1.5-size models, 8 GPUs) and
"tiny" (random-weight models small enough for CPU tests: a two-level UNet (channels 32, 64; one layer per
block; CVA at both levels and in the mid block), cross-attention dim 48, 64x64 views, patch size 4, a tiny VAE
and a 2-layer DINOv2). XLA's compile time on the CPU grows with the number of parameter tensors, so the tiny
UNet keeps few of them.
"""
from __future__ import annotations

from collections.abc import Callable

import ml_collections

from imagpose_jax.models.dinov2 import Dinov2Config, Dinov2Model
from imagpose_jax.models.imagpose import IMAGPose, IMAGPoseConfig
from imagpose_jax.models.init import ParamKeys
from imagpose_jax.models.unet_config import UNetConfig
from imagpose_jax.models.vae import AutoencoderKL, VAEConfig
from imagpose_jax.schedulers.common import alphas_cumprod
from imagpose_jax.train.stages import check_model_config, trainable_filter
from imagpose_jax.train.state import TrainState, make_tx
from imagpose_jax.train.step import StepConfig

VARIANTS = ("full", "tiny")
# Per stage: (learning rate, steps, DINOv2-only / patch-only / both dropout probabilities).
STAGE_SETTINGS = {1: (5e-5, 50_000, (0.1, 0.0, 0.0)),
                  2: (5e-5, 200_000, (0.05, 0.05, 0.05)),
                  3: (1e-6, 50_000, (0.05, 0.05, 0.05))}
# diffusers-style settings of the frozen encoders.
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_VAE = dict(SD15_VAE, block_out_channels=(32, 32, 64, 64), layers_per_block=1)
DINO_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14,
                 image_size=518)
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48, num_attention_heads=(2, 2),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 only_cross_attention=(False, False))
TINY_DINO = dict(DINO_BASE, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=224)


def base_config(stage: int, variant: str = "full") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if stage not in STAGE_SETTINGS:
        raise ValueError(f"stage must be one of {sorted(STAGE_SETTINGS)}, got {stage!r}")
    lr, steps, (p_image, p_ref, p_both) = STAGE_SETTINGS[stage]
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.variant = variant
    c.seed = 0
    c.steps = 100 if tiny else steps
    c.unet = dict(use_cva=stage != 1, **(TINY_UNET if tiny else {}))
    c.patch_size = 4 if tiny else 16  # tiny: a 64x64 view's 8x8 reference latents give 2x2 patch tokens
    # One stride-2 stage per entry after the first: the pose guider downscales by 2 ** (len - 1), which must be
    # the VAE's downscale factor 2 ** (len(vae.block_out_channels) - 1) (8 for SD's VAE).
    c.pose_guider_channels = (16, 32, 96, 256)
    c.vae = TINY_VAE if tiny else SD15_VAE
    c.dino = TINY_DINO if tiny else DINO_BASE
    # Data (`train/inputs.py`). format: "synthetic" (written under the workdir if `path` is empty),
    # "imagpose_json" (`index`: the original's JSON list of per-person image lists) or "deepfashion"
    # (`annotations`: fasion-resize-annotation-*.csv, `image_dir`). batch_size is global (all hosts).
    c.data = dict(format="synthetic" if tiny else "imagpose_json", path="", index="", annotations="", image_dir="",
                  height=64 if tiny else 512, width=64 if tiny else 512, batch_size=2 if tiny else 32,
                  read_threads=0 if tiny else 8, worker_count=0, prefetch=8, skip_corrupt=False,
                  synthetic=dict(num_persons=12, poses_per_person=6, seed=0, test_fraction=0.25))
    # Pretrained weights (converted parameter folders, `imagpose-convert`); empty: random initialisation.
    # model: stage 1 `imagpose-convert sd15 --unet-dir ...`; stage 2 `imagpose-convert add-cva --params
    # <stage-1 export>/denoiser --motion-module ...`; stage 3 the stage-2 export. vae / image_encoder:
    # the `vae/` and `image_encoder/` folders of `imagpose-convert pipeline` (or `vae`/`dinov2` conversions);
    # vae may also be a single file (a whole SD checkpoint or a standalone VAE file, e.g. vae-ft-mse-840000-ema-pruned).
    c.init = dict(model="", vae="", image_encoder="")
    # The loop (`train/loop.py`): metrics every log_every steps (metrics.jsonl + TensorBoard), orbax
    # checkpoints every checkpoint_every steps (newest `keep` kept), sample grids every sample_every (0: never).
    c.train = dict(log_every=1 if tiny else 50, checkpoint_every=50 if tiny else 2000, keep=3, async_checkpoint=True,
                   sample_every=0 if tiny else 5000, sample_steps=10 if tiny else 30, sample_guidance=2.0)
    # schedule: "constant" (the original's) or "cosine" (to 0.1 x learning_rate at `steps`); after warmup_steps.
    c.optim = dict(learning_rate=lr, b1=0.9, b2=0.999, weight_decay=0.01, eps=1e-8, clip_norm=1.0,
                   schedule="constant", warmup_steps=0)
    c.noise = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   rescale_betas_zero_snr=True, prediction_type="v_prediction")
    c.step = dict(noise_offset=0.05, snr_gamma=5.0, p_image=p_image, p_ref=p_ref, p_both=p_both,
                  compute_dtype="float32" if tiny else "bfloat16", remat=not tiny, remat_policy=None,
                  ema_decay=0.9999)
    c.ema = False
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c


def model_config(c: ml_collections.ConfigDict) -> IMAGPoseConfig:
    return IMAGPoseConfig(unet=UNetConfig(**c.unet.to_dict()), pose_guider_channels=tuple(c.pose_guider_channels),
                          patch_size=c.patch_size)


def training_schedule(c: ml_collections.ConfigDict):
    """The DDPM training schedule's alphas_cumprod (T,) float32."""
    return alphas_cumprod(c.noise.to_dict())


def step_config(c: ml_collections.ConfigDict) -> StepConfig:
    return StepConfig(**c.step.to_dict())


def optimizer(c: ml_collections.ConfigDict):
    return make_tx(**c.optim.to_dict(), total_steps=c.steps)


def state_builder(c: ml_collections.ConfigDict) -> Callable[[], TrainState]:
    """The `build` argument of `init_train_state`: random-weight models (pretrained weights are loaded
    into the sharded state afterwards) and an optimizer over the stage's trainable parameters."""
    mcfg = model_config(c)
    check_model_config(c.stage, mcfg)
    vae_factor, pose_factor = VAEConfig.from_dict(c.vae.to_dict()).downscale_factor, mcfg.pose_downscale_factor
    if vae_factor != pose_factor:
        raise ValueError(f"the VAE downscales by {vae_factor} but the pose guider by {pose_factor}: give "
                         f"pose_guider_channels {len(c.vae.block_out_channels)} entries")

    def build() -> TrainState:
        keys = ParamKeys(c.seed)
        return TrainState(IMAGPose(mcfg, rngs=keys), AutoencoderKL(VAEConfig.from_dict(c.vae.to_dict()), rngs=keys),
                          Dinov2Model(Dinov2Config.from_dict(c.dino.to_dict()), rngs=keys), optimizer(c),
                          trainable_filter(c.stage), seed=c.seed, ema=c.ema)
    return build


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """`path/to/config.py[:variant]` -> its `get_config(variant)`, then `key.sub=value` overrides (values read
    as Python literals where they parse, else as strings; an unknown key or a wrong type is an error)."""
    import ast
    import importlib.util
    import os
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"_imagpose_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} has no get_config()")
    c = module.get_config(variant) if variant else module.get_config()
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        parent = c
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in parent:
                raise KeyError(f"override {key!r}: no config field {p!r}")
            parent = parent[p]
        if parts[-1] not in parent:
            raise KeyError(f"override {key!r}: no config field {parts[-1]!r} (have {sorted(parent.keys())})")
        old = parent[parts[-1]]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            parent[parts[-1]] = value
        except TypeError as err:
            raise TypeError(f"override {key!r}={text!r}: {err}") from err
    return c
