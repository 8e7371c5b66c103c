"""The `pipeline` golden kind: the original `Pose2ImagePipeline` end to end, run with the settings that
reproduce the original's inference (`SamplerConfig.original_inference`)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from golden import check_tolerance, nhwc


def run_pipeline_case(folder, case) -> str:
    from convert_weights.dinov2 import load_dinov2
    from convert_weights.imagpose import load_imagpose
    from convert_weights.vae import load_vae
    from imagpose_jax.models.imagpose import IMAGPose, IMAGPoseConfig
    from imagpose_jax.models.init import abstract
    from imagpose_jax.preprocess import clip_preprocess, load_image, vae_preprocess
    from imagpose_jax.sampling.sampler import Sampler, SamplerConfig
    from flax import nnx

    cfg = IMAGPoseConfig.from_case(case)
    w, call, sch = case["weights"], case["call"], dict(case["scheduler"])
    model = abstract(lambda k: IMAGPose(cfg, rngs=k))
    nnx.update(model, load_imagpose(cfg, folder / w["unet"], folder / w["pose_guider"], folder / w["patch"]))
    _, vae = load_vae(folder / w["vae"])
    _, dino = load_dinov2(folder / w["image_encoder"])
    if sch.pop("name", "DDIM") != "DDIM":
        raise AssertionError(f"{folder.name}: only DDIM pipeline cases are supported, got {case['scheduler']}")
    grid_hw = (2 * call["view_height"], 2 * call["view_width"])
    scfg = SamplerConfig.original_inference(num_inference_steps=call["num_inference_steps"],
                                            guidance_scale=call["guidance_scale"]).replace(scheduler_config=sch)
    ref = load_image(folder / call["ref_image"])
    flag = np.asarray(Image.open(folder / call["flag_grid"]).convert("L"), np.float32)[..., None] / 255.0
    batch = {
        "masked_grid": vae_preprocess(load_image(folder / call["image_mask_grid"]), grid_hw)[None],
        "pose_grid": (np.asarray(load_image(folder / call["pose_grid"]).resize(grid_hw[::-1], Image.LANCZOS)
                      if load_image(folder / call["pose_grid"]).size != grid_hw[::-1]
                      else load_image(folder / call["pose_grid"]), np.float32)[None] / 255.0),
        "flag_grid": flag[None],
        "ref_pixels": vae_preprocess(ref, grid_hw)[None],
        "dino_pixels": clip_preprocess(ref, squash_to_224=True)[None],
    }
    noise = nhwc(np.load(folder / "inputs.npz")["init_noise"])
    images = Sampler(model, vae, dino, scfg)(batch, noise=noise)
    return check_tolerance(case, images, np.load(folder / "expected.npz")["image"], f"{folder.name} image")
