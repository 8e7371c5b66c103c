"""`imagpose demo` at a toy size: the whole run (a few VAE steps, two held-out persons, 2 sampling steps) writes
the sheets and metrics.json, and its baselines are what they claim to be. The denoiser's training is replaced by
an export of the random-initialised models (the trainer has its own tests, `test_train_loop.py`), which keeps
this file's compilations to the VAE step and the sampler."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from imagpose_jax import demo
from imagpose_jax.data.grid import untile
from imagpose_jax.data.index import read_imagpose_json
from imagpose_jax.metrics import evaluate_pairs
from imagpose_jax.train.config import load_config

TOY_OVERRIDES = ["data.synthetic.num_persons=6", "data.synthetic.poses_per_person=4", "data.synthetic.test_fraction=0.34",
                 "demo.vae_steps=2", "demo.vae_batch=4", "steps=2", "data.batch_size=2", "demo.eval_persons=2",
                 "demo.sample_steps=2"]
TOY = load_config(demo.DEFAULT_CONFIG, TOY_OVERRIDES)
EXPORT_SEED_OFFSET = 1   # the stand-in "trained" weights: another seed than the untrained baseline's (c.seed)
VIEW_OF_SLOT = {1: {3: 1}, 2: {1: 1, 2: 2, 3: 3}, 3: {3: 3}}  # make_eval_example's default view ids


def _export_without_training(c, workdir, progress=True):
    """Stands in for `train.loop.train`: the export folders of random-initialised models, the denoiser from another
    seed than the untrained baseline's, so that a baseline wired to the exported weights is seen."""
    from flax import nnx

    from imagpose_jax.checkpoint.params import save_params
    from imagpose_jax.models.dinov2 import Dinov2Config, Dinov2Model
    from imagpose_jax.models.imagpose import IMAGPose
    from imagpose_jax.testing import drawn_modules
    from imagpose_jax.train import config as tc
    model, dino = drawn_modules(lambda k: IMAGPose(tc.model_config(c), rngs=k),
                                lambda k: Dinov2Model(Dinov2Config.from_dict(c.dino.to_dict()), rngs=k),
                                seed=c.seed + EXPORT_SEED_OFFSET)
    export = os.path.join(workdir, "export")
    save_params(os.path.join(export, "denoiser"), tc.model_config(c).to_dict(), nnx.state(model, nnx.Param))
    save_params(os.path.join(export, "image_encoder"), c.dino.to_dict(), nnx.state(dino, nnx.Param))
    shutil.copytree(c.init.vae, os.path.join(export, "vae"))
    return {"steps": c.steps, "init_s": 0.0, "first_step_s": None, "final_loss": None, "export": export}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("imagpose_jax.train.loop.train", _export_without_training)
        return out, demo.run(out, TOY, progress=False)


def test_writes_sheets_and_metrics(toy_run):
    out, metrics = toy_run
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f) == json.loads(json.dumps(metrics))
    n_targets = {1: 1, 2: 3, 3: 1}
    n_sources = {1: 1, 2: 1, 3: 3}
    for n in (1, 2, 3):
        s = metrics["scenarios"][str(n)]
        assert set(s) == {"trained", "untrained", "copy_source"}
        for k in s:
            assert s[k]["n"] == TOY.demo.eval_persons * n_targets[n]
            assert set(s[k]) >= {"ssim", "psnr", "l1"} and all(np.isfinite(s[k][m]) for m in ("ssim", "psnr", "l1"))
        sheet = np.asarray(Image.open(os.path.join(out, f"scenario_{n}", "sheet.png")))
        v = TOY.data.height
        assert sheet.shape == (TOY.demo.eval_persons * n_targets[n] * v, (n_sources[n] + 3) * v, 3)
    for k in ("trained", "untrained", "copy_source"):
        assert metrics["overall"][k]["n"] == TOY.demo.eval_persons * 5
    assert set(metrics["timings"]) >= {"dataset_s", "vae_s", "train_s", "sample_and_score_s", "total_s"}
    assert set(metrics["vae"]["held_out_reconstruction"]) >= {"ssim", "psnr", "l1"}
    assert metrics["denoiser"]["steps"] == TOY.steps
    for sub in ("denoiser", "vae", "image_encoder"):
        assert os.path.isdir(os.path.join(out, "train", "export", sub))


def test_copy_source_baseline_recomputed(toy_run):
    """The copy-source numbers equal the metrics of the held-out persons' first view against their target views,
    read from the PNG files directly."""
    out, metrics = toy_run
    persons = read_imagpose_json(os.path.join(out, "data", "test.json"))
    persons = [p for p in persons if p.name in metrics["held_out_persons"]]
    assert len(persons) == TOY.demo.eval_persons
    for n in (1, 2, 3):
        pred, truth = [], []
        for p in persons:
            for slot in demo.target_slots(n):
                pred.append(_load(p.views[0].image))
                truth.append(_load(p.views[VIEW_OF_SLOT[n][slot]].image))
        ref = evaluate_pairs(np.stack(pred), np.stack(truth))
        for m in ("ssim", "psnr", "l1"):
            assert metrics["scenarios"][str(n)]["copy_source"][m] == pytest.approx(ref[m], rel=1e-4, abs=1e-5)


def test_target_views_and_sheet_layout():
    """target_views picks the scenario's unknown slots in person-major order; the sheet rows end with the truth."""
    rng = np.random.default_rng(0)
    grids = rng.random((2, 128, 128, 3)).astype(np.float32)
    for n in (1, 2, 3):
        got = demo.target_views(grids, n)
        want = np.stack([untile(g)[s] for g in grids for s in {1: [3], 2: [1, 2, 3], 3: [3]}[n]])
        np.testing.assert_array_equal(got, want)
    examples = [{"grid": g * 2 - 1, "pose_grid": g[::-1]} for g in grids]
    gen = demo.target_views(grids, 2)
    s = demo.sheet(examples, 2, gen)
    assert s.shape == (6 * 64, 4 * 64, 3)
    np.testing.assert_allclose(s[:64, 128:192] / 255, gen[0], atol=1 / 255)   # generated column
    np.testing.assert_allclose(s[:64, 192:] / 255, untile(grids[0])[1], atol=1 / 255)  # ground truth column


def _load(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255


def test_trained_scores_and_margins_recomputed_from_the_files(toy_run):
    """The trained numbers equal the metrics of the written generated_*.png against the held-out views read from
    the dataset's files (8-bit rounding aside), the margins are those recomputed numbers minus the copy-source
    ones, and the untrained baseline (other weights) scores differently."""
    out, metrics = toy_run
    persons = [p for p in read_imagpose_json(os.path.join(out, "data", "test.json"))
               if p.name in metrics["held_out_persons"]]
    recomputed = {}
    for n in (1, 2, 3):
        truth = [_load(p.views[VIEW_OF_SLOT[n][slot]].image) for p in persons for slot in demo.target_slots(n)]
        gen = [_load(os.path.join(out, f"scenario_{n}", f"generated_{j:03d}.png")) for j in range(len(truth))]
        recomputed[n] = r = evaluate_pairs(np.stack(gen), np.stack(truth))
        s = metrics["scenarios"][str(n)]
        assert s["trained"]["ssim"] == pytest.approx(r["ssim"], abs=5e-3)
        assert s["trained"]["l1"] == pytest.approx(r["l1"], abs=2e-3)
        margins = metrics["margins"][f"scenario_{n}"]
        assert margins["ssim_trained_minus_copy_source"] == pytest.approx(r["ssim"] - s["copy_source"]["ssim"], abs=5e-3)
        assert margins["l1_copy_source_minus_trained"] == pytest.approx(s["copy_source"]["l1"] - r["l1"], abs=2e-3)
        assert abs(s["untrained"]["l1"] - s["trained"]["l1"]) > 1e-4, "the untrained baseline used the trained weights"
