"""`imagpose demo`, the main job: the whole system on the built-in synthetic dataset, offline, on the CPU.

The training fields are those of a stage-3 run (configs/stage3.py) at the tiny models' size, with the demo's own
VAE (pre-trained by the demo on the training views, then frozen) and a pose guider matching it; `demo` holds the
demo's other settings (the VAE pre-training, the held-out scoring).

  imagpose demo --out outputs/demo
  imagpose demo --out outputs/long --config.steps=3000 --config.demo.vae_steps=2000   (overrides: config_flags)
"""
import ml_collections

from imagpose_jax import testing
from imagpose_jax.schedulers.common import NOISE_SCHEDULE


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, ""):
        raise ValueError(f"configs/demo.py takes no variant, got {arg!r}")
    c = ml_collections.ConfigDict()
    c.stage = 3
    c.seed = 0
    c.steps = 1000                     # denoiser training steps

    # Models: the tiny denoiser (`imagpose_jax.testing`); a narrow three-block VAE (downscale 4, so a 64x64 view
    # is 16x16 latents, enough for the synthetic figures' limbs; SD's factor 8 would leave 8x8; its scaling factor
    # is fitted by the pre-training) and a pose guider with as many stages; the tiny DINOv2, random and frozen.
    c.unet = dict(testing.TINY_UNET, use_cva=True)
    c.pose_guider_channels = (16, 32, 64)
    c.patch_size = testing.TINY_PATCH_SIZE
    c.vae = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=2, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    c.dino = dict(testing.TINY_DINO)
    c.init = dict(model="", vae="", image_encoder="")   # vae: set by the demo to its pre-trained VAE

    # Data: the synthetic dataset, written by the demo (persons, not images, split into train and test).
    c.data = dict(format="synthetic", path="", index="", annotations="", image_dir="", height=testing.TINY_VIEW,
                  width=testing.TINY_VIEW, batch_size=4, read_threads=0, worker_count=0, prefetch=8,
                  check_images=True, skip_corrupt=False, max_corrupt_fraction=0.01,
                  synthetic=dict(num_persons=64, poses_per_person=8, seed=0, test_fraction=0.15))

    c.noise = dict(NOISE_SCHEDULE)
    c.step = dict(noise_offset=0.05, snr_gamma=5.0, p_image=0.05, p_ref=0.05, p_both=0.05, compute_dtype="float32",
                  matmul_precision="highest", ema_decay=0.9999)
    c.ema = False
    c.optim = dict(learning_rate=1e-3, b1=0.9, b2=0.999, weight_decay=0.01, eps=1e-8, clip_norm=1.0,
                   schedule="cosine", warmup_steps=50)
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.train = dict(log_every=50, checkpoint_every=1000, keep=3, async_checkpoint=False, sample_every=0,
                   sample_steps=10, sample_guidance=2.0,
                   max_nonfinite=5)

    c.demo = dict(
        vae_steps=1000,        # VAE pre-training steps
        vae_time_s=0.0,        # > 0: also stop the VAE pre-training after this many seconds (not reproducible)
        vae_batch=16,
        vae_crop=32,           # the VAE trains on random crops this size (0: whole views)
        vae_lr=2e-3,
        eval_persons=8,        # held-out persons scored per scenario
        sample_steps=20,
        guidance=1.0,
    )
    return c
