"""The `pipeline` golden kind: the original `Pose2ImagePipeline` end to end, run with the settings that
reproduce the original's inference (`SamplerConfig.original_inference`), the way `imagpose generate` runs it: the
case converted to an inference folder (`imagpose-convert pipeline`), loaded with `IMAGPosePipeline.from_pretrained`
in the dtype asked for, sampled from the case's noise."""
from __future__ import annotations

import tempfile

import numpy as np
from PIL import Image

from golden import check_tolerance, nhwc

# Half precision against the case's float32 expectation: max and mean |ours - expected| over the image in [0, 1],
# 2.4-2.9x what pipeline_3src_1tgt measured on the CPU (jax 0.10.2; README, "Half precision"): bfloat16 max 0.0571,
# mean 0.00414; float16 max 0.00678, mean 0.000523.
HALF_TOLERANCE = {"bfloat16": {"abs_max": 0.15, "abs_mean": 0.01},
                  "float16": {"abs_max": 0.02, "abs_mean": 0.0015}}


def run_pipeline_case(folder, case, dtype: str = "float32") -> str:
    from convert_weights.cli import main as convert
    from imagpose_jax.data.batch import make_example, stack
    from imagpose_jax.data.grid import untile
    from imagpose_jax.preprocess import load_image, vae_preprocess
    from imagpose_jax.sampling.pipeline import IMAGPosePipeline
    from imagpose_jax.sampling.sampler import SamplerConfig

    w, call, sch = case["weights"], case["call"], dict(case["scheduler"])
    if sch.pop("name", "DDIM") != "DDIM":
        raise AssertionError(f"{folder.name}: only DDIM pipeline cases are supported, got {case['scheduler']}")
    grid_hw = (2 * call["view_height"], 2 * call["view_width"])
    scfg = SamplerConfig.original_inference(num_inference_steps=call["num_inference_steps"],
                                            guidance_scale=call["guidance_scale"]).replace(scheduler_config=sch)
    with tempfile.TemporaryDirectory() as tmp:
        convert(["pipeline", "--unet", str(folder / w["unet"]), "--pose-guider", str(folder / w["pose_guider"]),
                 "--patch", str(folder / w["patch"]), "--vae", str(folder / w["vae"]),
                 "--image-encoder", str(folder / w["image_encoder"]), "--config", str(folder / "case.json"),
                 "--out", f"{tmp}/weights"])
        pipe = IMAGPosePipeline.from_pretrained(f"{tmp}/weights", scfg, dtype=dtype)
    ref = load_image(folder / call["ref_image"])
    pose = load_image(folder / call["pose_grid"])
    if pose.size != grid_hw[::-1]:
        pose = pose.resize(grid_hw[::-1], Image.LANCZOS)
    example = make_example(untile(vae_preprocess(load_image(folder / call["image_mask_grid"]), grid_hw)),
                           untile(np.asarray(pose, np.float32) / 255.0), known_from_flag(folder / call["flag_grid"]),
                           ref, ref_size=grid_hw, dino_squash=True)
    noise = nhwc(np.load(folder / "inputs.npz")["init_noise"])
    images = pipe.sampler(stack([example]), noise=noise)
    tol = None if dtype == "float32" else HALF_TOLERANCE[dtype]
    return check_tolerance(case, images, np.load(folder / "expected.npz")["image"], f"{folder.name} image ({dtype})",
                           tol)


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
