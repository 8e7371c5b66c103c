"""IMAGPose training stage 1 (spec section 6): UNet + pose guider + patch embedding, no CVA, from SD1.5
weights [50k steps, lr 5e-5; DINOv2 tokens dropped with p 0.1].

  get_config()        the original's settings (SD1.5-size models, 512x512 views, bf16 compute, remat)
  get_config("tiny")  random-weight tiny models on 64x64 views, for CPU tests

Run (the tiny CPU variant: configs/stageN.py:tiny; overrides as --config.KEY=VALUE):
  imagpose train --config configs/stage1.py --workdir runs/stage1 --config.data.index=train.json \
      --config.init.model=init/ --config.init.vae=weights/vae --config.init.image_encoder=weights/image_encoder
"""
from imagpose_jax.train.config import base_config


def get_config(variant: str = "full"):
    return base_config(1, variant)
