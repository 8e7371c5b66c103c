"""The training configuration shared by `configs/stage{1,2,3}.py` (ml-collections), and the objects built
from it. Variants: "full" (the original's settings, spec section 6: SD1.5-size models, 8 GPUs) and
"tiny" (random-weight models small enough for CPU tests: UNet channels (32, 32, 64, 64), cross-attention
dim 48, 64x64 views, patch size 4, a tiny VAE and a 2-layer DINOv2).
"""
from __future__ import annotations

from collections.abc import Callable

import ml_collections
from flax import nnx

from imagpose_jax.models.dinov2 import Dinov2Config, Dinov2Model
from imagpose_jax.models.imagpose import IMAGPose, IMAGPoseConfig
from imagpose_jax.models.init import ParamKeys
from imagpose_jax.models.unet_config import UNetConfig
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
    c.seed = 0
    c.steps = 100 if tiny else steps
    c.unet = dict(use_cva=stage != 1, **(dict(block_out_channels=(32, 32, 64, 64), cross_attention_dim=48)
                                         if tiny else {}))
    c.patch_size = 4 if tiny else 16  # tiny: a 64x64 view's 8x8 reference latents give 2x2 patch tokens
    c.vae = TINY_VAE if tiny else SD15_VAE
    c.dino = TINY_DINO if tiny else DINO_BASE
    c.data = dict(height=64 if tiny else 512, width=64 if tiny else 512, batch_size=2 if tiny else 32)
    c.optim = dict(learning_rate=lr, b1=0.9, b2=0.999, weight_decay=0.01, eps=1e-8, clip_norm=1.0)
    c.noise = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   rescale_betas_zero_snr=True, prediction_type="v_prediction")
    c.step = dict(noise_offset=0.05, snr_gamma=5.0, p_image=p_image, p_ref=p_ref, p_both=p_both,
                  compute_dtype="float32" if tiny else "bfloat16", remat=not tiny, remat_policy=None,
                  ema_decay=0.9999)
    c.ema = False
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c


def model_config(c: ml_collections.ConfigDict) -> IMAGPoseConfig:
    return IMAGPoseConfig(unet=UNetConfig(**c.unet.to_dict()), patch_size=c.patch_size)


def training_schedule(c: ml_collections.ConfigDict):
    """The DDPM training schedule's alphas_cumprod (T,) float32."""
    return alphas_cumprod(c.noise.to_dict())


def step_config(c: ml_collections.ConfigDict) -> StepConfig:
    return StepConfig(**c.step.to_dict())


def optimizer(c: ml_collections.ConfigDict):
    return make_tx(**c.optim.to_dict())


def default_vae(vae_config: dict, keys: ParamKeys) -> nnx.Module:
    from imagpose_jax.models.vae import AutoencoderKL, VAEConfig
    return AutoencoderKL(VAEConfig.from_dict(vae_config), rngs=keys)


def state_builder(c: ml_collections.ConfigDict,
                  make_vae: Callable[[dict, ParamKeys], nnx.Module] = default_vae) -> Callable[[], TrainState]:
    """The `build` argument of `init_train_state`: random-weight models (pretrained weights are loaded
    into the sharded state afterwards) and an optimizer over the stage's trainable parameters."""
    mcfg = model_config(c)
    check_model_config(c.stage, mcfg)

    def build() -> TrainState:
        keys = ParamKeys(c.seed)
        return TrainState(IMAGPose(mcfg, rngs=keys), make_vae(c.vae.to_dict(), keys),
                          Dinov2Model(Dinov2Config.from_dict(c.dino.to_dict()), rngs=keys), optimizer(c),
                          trainable_filter(c.stage), seed=c.seed, ema=c.ema)
    return build
