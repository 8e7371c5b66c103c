"""The `train_loss` golden kind: the original's training objective and the stage's gradients on one fixed batch,
computed by `train.step.loss_and_grads` (the function the train step runs), with the case's random draws as inputs.
Gradients are mapped to the original's names and layouts by the converter's own table (`nnx_to_torch`)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from golden import check_tolerance, nhwc

PARTS = ("unet", "pose_guider", "patch")


def run_train_loss_case(folder, case) -> str:
    from convert_weights.core import nnx_to_torch
    from convert_weights.imagpose import UNET_RENAMES, load_imagpose
    from imagpose_jax.models.imagpose import IMAGPose, IMAGPoseConfig
    from imagpose_jax.models.init import abstract
    from imagpose_jax.schedulers.common import alphas_cumprod
    from imagpose_jax.train.stages import check_model_config, trainable_filter
    from imagpose_jax.train.step import LossInputs, StepConfig, loss_and_grads
    from flax import nnx

    stage, sch = case["stage"], dict(case["scheduler"])
    if sch.get("prediction_type") != "v_prediction":
        raise AssertionError(f"{folder.name}: the objective is v-prediction; the case has {sch.get('prediction_type')!r}")
    cfg = IMAGPoseConfig.from_case(case)
    check_model_config(stage, cfg)
    w = case["weights"]
    model = abstract(lambda k: IMAGPose(cfg, rngs=k))
    nnx.update(model, load_imagpose(cfg, folder / w["unet"], folder / w["pose_guider"], folder / w["patch"]))
    x = np.load(folder / "inputs.npz")
    b = x["latents"].shape[0]
    inputs = LossInputs(
        image_embeds=jnp.asarray(x["image_embeds"]), ref_latents=jnp.asarray(nhwc(x["ref_latents"])),
        masked_latents=jnp.asarray(nhwc(x["masked_latents"])), pose_grid=jnp.asarray(nhwc(x["pose_image"])),
        known=jnp.asarray(x["known"]), latents=jnp.asarray(nhwc(x["latents"])), noise=jnp.asarray(nhwc(x["noise"])),
        timesteps=jnp.asarray(x["timestep"], jnp.int32), keep_image=jnp.ones((b,)), keep_patch=jnp.ones((b,)))
    step_cfg = StepConfig(snr_gamma=case["snr_gamma"], compute_dtype="float32")
    loss, aux, grads = nnx.jit(loss_and_grads, static_argnums=(1, 4))(
        model, trainable_filter(stage), inputs, alphas_cumprod(sch), step_cfg)

    # The flag we build from the known slots is the one the original trained with.
    from imagpose_jax.models.imagpose import slot_mask
    h, w_ = inputs.latents.shape[1:3]
    np.testing.assert_array_equal(np.asarray(slot_mask(inputs.known, h, w_)), nhwc(x["flag"]),
                                  err_msg=f"{folder.name}: flag from the known slots differs from the case's flag")

    exp = np.load(folder / "expected.npz")
    tol = case["tolerance"]
    lines = []
    loss_rel = abs(float(loss) - float(exp["loss"])) / abs(float(exp["loss"]))
    assert loss_rel <= tol["loss_rel"], f"{folder.name} loss: {float(loss):.7g} vs {float(exp['loss']):.7g}, rel {loss_rel:.3g} > {tol['loss_rel']}"
    lines.append(f"{folder.name} loss: rel {loss_rel:.3g} (tolerance {tol['loss_rel']})")
    for name, ours, key in (("weight", aux["weight"], "weight"),):
        np.testing.assert_allclose(np.asarray(ours), exp[key], rtol=1e-5, err_msg=f"{folder.name} {name}")
    lines.append(check_tolerance({"tolerance": {"rel_max": tol["model_pred_rel_max"]}},
                                 _nchw(aux["target"]), exp["target"], f"{folder.name} target"))
    lines.append(check_tolerance({"tolerance": {"rel_max": tol["model_pred_rel_max"]}},
                                 _nchw(aux["pred"]), exp["model_pred"], f"{folder.name} model_pred"))

    ours = {}
    for part in PARTS:
        if part in grads:
            sd = nnx_to_torch(grads[part], renames=UNET_RENAMES if part == "unet" else ())
            ours.update({f"{part}.{k}": v for k, v in sd.items()})
    want = set(case["trainable"])
    assert set(ours) == want, (f"{folder.name}: trainable parameters differ from the original's: ours only "
                               f"{sorted(set(ours) - want)[:5]}, theirs only {sorted(want - set(ours))[:5]}")
    scale = case["grad_scale"]
    worst, worst_name = 0.0, ""
    for name in sorted(want):
        g = exp[f"grad/{name}"].astype(np.float64)
        o = np.asarray(ours[name], np.float64)
        assert o.shape == g.shape, f"{folder.name} grad {name}: shape {o.shape} != expected {g.shape}"
        rel = np.abs(o - g).max() / max(np.abs(g).max(), 1e-3 * scale)
        if rel > worst:
            worst, worst_name = rel, name
    assert worst <= tol["grad_rel_max"], (f"{folder.name} grad {worst_name}: rel_max {worst:.3g} > tolerance "
                                          f"{tol['grad_rel_max']}")
    lines.append(f"{folder.name} grads ({len(want)} tensors): worst rel {worst:.3g} at {worst_name} "
                 f"(tolerance {tol['grad_rel_max']:.3g})")
    return "\n".join(lines)


def _nchw(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))
