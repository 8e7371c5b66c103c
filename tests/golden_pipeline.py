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
    from imagpose_jax.data.batch import make_example, stack
    from imagpose_jax.data.grid import untile
    from imagpose_jax.preprocess import load_image, vae_preprocess
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
    pose = load_image(folder / call["pose_grid"])
    if pose.size != grid_hw[::-1]:
        pose = pose.resize(grid_hw[::-1], Image.LANCZOS)
    example = make_example(untile(vae_preprocess(load_image(folder / call["image_mask_grid"]), grid_hw)),
                           untile(np.asarray(pose, np.float32) / 255.0), known_from_flag(folder / call["flag_grid"]),
                           ref, ref_size=grid_hw, dino_squash=True)
    batch = stack([example])
    noise = nhwc(np.load(folder / "inputs.npz")["init_noise"])
    images = Sampler(model, vae, dino, scfg)(batch, noise=noise)
    return check_tolerance(case, images, np.load(folder / "expected.npz")["image"], f"{folder.name} image")


def known_from_flag(path) -> np.ndarray:
    """The case's flag grid PNG (white over known slots) -> (4,) bools; the flag must be constant per slot, as the
    model builds it from the known slots (`models.imagpose.slot_mask`)."""
    from imagpose_jax.data.grid import untile
    flag = np.asarray(Image.open(path).convert("L"), np.float32)[..., None] / 255.0
    slots = untile(flag)                                                     # (4, h, w, 1)
    known = slots.reshape(4, -1).mean(1) > 0.5
    if not np.array_equal(slots, np.broadcast_to(known[:, None, None, None], slots.shape).astype(np.float32)):
        raise AssertionError(f"{path}: the flag grid is not 0/1 constant over each slot")
    return known
