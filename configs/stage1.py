"""IMAGPose training stage 1 (spec section 6): UNet + pose guider + patch embedding, no CVA, from SD1.5 weights.

The original's settings [50k steps, lr 5e-5, DINOv2 tokens dropped with p 0.1]; `:tiny` is the same run with
random-weight tiny models on 64x64 synthetic views, for the CPU.

  imagpose train --config configs/stage1.py --workdir runs/stage1 --config.data.index=train.json \
      --config.init.model=init/ --config.init.vae=weights/vae --config.init.image_encoder=weights/image_encoder
  imagpose train --config configs/stage1.py:tiny --workdir runs/tiny1
Any field is overridden as --config.KEY=VALUE (ml-collections' `config_flags`); `init.model` comes from
`imagpose-convert sd15 --unet-dir SD/unet` (or `--single-file v1-5-pruned-emaonly.safetensors`).
"""

import ml_collections

from imagpose_jax import testing
from imagpose_jax.schedulers.common import NOISE_SCHEDULE


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "tiny"):
        raise ValueError(f"configs/stage1.py: unknown variant {arg!r} (none, or 'tiny')")
    c = ml_collections.ConfigDict()
    c.stage = 1
    c.seed = 0
    c.steps = 50_000

    # Models. The denoiser: SD1.5's UNet (`UNetConfig`'s defaults: 320/640/1280/1280, 8 heads, context 768)
    # no CVA; the pose guider (one stride-2 stage per entry after the first: it downscales by 8, as the VAE); the
    # patch embedding (kernel = stride = 16: a 512x512 view's 64x64 reference latents give 16 tokens). remat
    # "block": each resnet, transformer and CVA module recomputed on its own in the backward pass ("none": kept).
    c.unet = dict(use_cva=False, remat="block", remat_policy=None)
    c.pose_guider_channels = (16, 32, 96, 256)
    c.patch_size = 16
    # Frozen encoders, as their diffusers / transformers config.json: sd-vae-ft-mse and dinov2-base.
    c.vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    c.dino = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14,
                  image_size=518)
    # Pretrained weights: converted parameter folders (`imagpose-convert`); empty: random initialisation. vae may
    # also be a single file (a whole SD checkpoint, or e.g. vae-ft-mse-840000-ema-pruned.safetensors).
    c.init = dict(model="", vae="", image_encoder="")

    # Data (`train/inputs.py`). format: "imagpose_json" (`index`: the original's JSON list of per-person image
    # lists), "deepfashion" (`annotations`: fasion-resize-annotation-*.csv, `image_dir`) or "synthetic" (written
    # under the workdir when `path` is empty). batch_size is global (all hosts; 16: one
    # grid per chip of a v5e-16, where 32 does not fit); views are height x width. Every file
    # is checked to read before training (check_images; `data/check.py`): the first unreadable one stops the run
    # naming it, or with skip_corrupt the examples using one are skipped, giving up past max_corrupt_fraction of them.
    c.data = dict(format="imagpose_json", path="", index="", annotations="", image_dir="", height=512, width=512,
                  batch_size=16, read_threads=8, worker_count=0, prefetch=8, check_images=True, skip_corrupt=False,
                  max_corrupt_fraction=0.01,
                  synthetic=dict(num_persons=12, poses_per_person=6, seed=0, test_fraction=0.25))

    # Objective (spec section 6): the noise schedule, offset noise, min-SNR-5, classifier-free-guidance dropout
    # (per sample: DINOv2 tokens only p_image, patch tokens only p_ref, both p_both), bf16 compute on fp32
    # master weights; on TPU, float32 matmuls as one bf16 pass ("default"; "highest": exact, as on the CPU).
    c.noise = dict(NOISE_SCHEDULE)
    p_image, p_ref, p_both = 0.1, 0.0, 0.0
    c.step = dict(noise_offset=0.05, snr_gamma=5.0, p_image=p_image, p_ref=p_ref, p_both=p_both,
                  compute_dtype="bfloat16", matmul_precision="default", ema_decay=0.9999)
    c.ema = False
    # AdamW with global-norm clipping; schedule "constant" (the original's) or "cosine" (to 0.1 x lr at `steps`).
    c.optim = dict(learning_rate=5e-5, b1=0.9, b2=0.999, weight_decay=0.01, eps=1e-8, clip_norm=1.0,
                   schedule="constant", warmup_steps=0)
    # Devices: data x fsdp x tensor (-1: all remaining devices). Parameters, gradients and Adam moments sharded
    # over every chip (FSDP), so that the step fits a v5e-16 at 512x512 views (`imagpose aot --plan_only`, README).
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    # The loop: metrics every log_every steps (metrics.jsonl + TensorBoard), orbax checkpoints every
    # checkpoint_every (newest `keep` kept), sample grids every sample_every steps (0: never); a non-finite loss or
    # gradient skips that update, and max_nonfinite such steps in a row stop the run.
    c.train = dict(log_every=50, checkpoint_every=2000, keep=3, async_checkpoint=True, sample_every=5000,
                   sample_steps=30, sample_guidance=2.0,
                   max_nonfinite=5)

    if arg == "tiny":  # the tiny models of `imagpose_jax.testing` on 64x64 synthetic views, fp32, for the CPU
        c.steps = 100
        c.unet = dict(testing.TINY_UNET, use_cva=False, remat="none", remat_policy=None)
        c.patch_size = testing.TINY_PATCH_SIZE
        c.vae = dict(testing.TINY_VAE)
        c.dino = dict(testing.TINY_DINO)
        c.data.update(format="synthetic", height=testing.TINY_VIEW, width=testing.TINY_VIEW, batch_size=2,
                      read_threads=0)
        c.step.update(compute_dtype="float32", matmul_precision="highest")
        c.mesh.update(data=-1, fsdp=1)   # data parallel over the CPU devices
        c.train.update(log_every=1, checkpoint_every=50, sample_every=0, sample_steps=10)
    return c
