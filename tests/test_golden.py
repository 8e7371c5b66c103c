"""`pytest -m golden`: one test per golden case folder (../shared/golden, or $IMAGPOSE_GOLDEN_DIR)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golden import case_dirs, check_tolerance, golden_dir, load_case, nchw, nhwc

CASES = case_dirs()


def run_forward(folder, case) -> str:
    """`cva_forward` / `stage1_forward`: `IMAGPose.condition` then `IMAGPose.denoise` on the given inputs (the case's
    flag channel holds arbitrary values, so it is passed as it is)."""
    from convert_weights.imagpose import load_imagpose
    from imagpose_jax.models.imagpose import IMAGPoseConfig, IMAGPose
    from imagpose_jax.models.init import abstract
    from flax import nnx

    cfg = IMAGPoseConfig.from_case(case)
    assert cfg.unet.use_cva == (case["kind"] == "cva_forward"), "case kind and unet_config disagree about CVA"
    w = case["weights"]
    params = load_imagpose(cfg, folder / w["unet"], folder / w["pose_guider"], folder / w["patch"])
    model = abstract(lambda k: IMAGPose(cfg, rngs=k))
    nnx.update(model, params)
    x = np.load(folder / "inputs.npz")
    sample = jnp.asarray(nhwc(x["sample"]))                       # (B, h, w, 9) = [noisy 4 | flag 1 | masked 4]

    def forward(m, sample, t, image_embeds, ref_latents, pose):
        cond = m.condition(image_embeds, ref_latents, sample[..., 5:], pose, flag=sample[..., 4:5])
        return m.denoise(sample[..., :4], t, cond)

    out = nnx.jit(forward)(model, sample, jnp.asarray(x["timestep"]), jnp.asarray(x["image_embeds"]),
                           jnp.asarray(nhwc(x["ref_latents"])), jnp.asarray(nhwc(x["pose_image"])))
    return check_tolerance(case, nchw(out), np.load(folder / "expected.npz")["out"], f"{folder.name} out")


def run_pipeline(folder, case, dtype: str = "float32") -> str:
    from golden_pipeline import run_pipeline_case
    return run_pipeline_case(folder, case, dtype)


def run_train_loss(folder, case) -> str:
    from golden_train import run_train_loss_case
    return run_train_loss_case(folder, case)


RUNNERS = {"cva_forward": run_forward, "stage1_forward": run_forward, "pipeline": run_pipeline,
           "train_loss": run_train_loss}


@pytest.mark.golden
@pytest.mark.parametrize("folder", CASES or [None], ids=[p.name for p in CASES] or ["no-cases"])
def test_golden_case(folder):
    if folder is None:
        pytest.fail(f"no golden cases found in {golden_dir()} (set IMAGPOSE_GOLDEN_DIR to a folder of case folders)")
    case = load_case(folder)
    kind = case.get("kind")
    if kind not in RUNNERS:
        pytest.fail(f"{folder.name}: unknown case kind {kind!r} (known: {sorted(RUNNERS)})")
    with jax.default_matmul_precision("highest"):
        print(RUNNERS[kind](folder, case))


PIPELINES = [p for p in CASES if load_case(p).get("kind") == "pipeline"]
HALF = [pytest.param(p, "bfloat16", id=f"{p.name}-bfloat16") for p in PIPELINES] + \
       [pytest.param(p, "float16", id=f"{p.name}-float16", marks=pytest.mark.slow) for p in PIPELINES]


@pytest.mark.golden
@pytest.mark.parametrize("folder,dtype", HALF)
def test_golden_pipeline_half_precision(folder, dtype):
    """The pipeline cases with the models loaded in half precision (`imagpose generate --dtype`), against the
    float32 expectation with `golden_pipeline.HALF_TOLERANCE` (float16 with -m slow: the suite's time)."""
    with jax.default_matmul_precision("highest"):
        print(run_pipeline(folder, load_case(folder), dtype))
