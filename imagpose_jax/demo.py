"""`imagpose demo`: the whole system on the built-in synthetic dataset, offline, on the CPU.

1. writes the synthetic pose-transfer dataset (data/; persons, not images, split into train and test),
2. pre-trains the demo's VAE (an `AutoencoderKL` with three narrow blocks, downscale 4) on random crops of the
   training images (vae/; its held-out reconstruction, `vae.held_out_reconstruction` in metrics.json, is the
   generator's upper bound),
3. trains the tiny denoiser (stage 3: UNet with CVA, a three-stage pose guider to match the VAE, patch
   embedding) from scratch with the trainer (`train/loop.py`, workdir train/; the VAE and a random tiny DINOv2
   frozen),
4. generates the unknown slots of held-out persons in all three scenarios (spec section 2) and scores the
   generated target views against the ground truth (SSIM with the 51-pixel window, PSNR, L1), next to two
   baselines: "copy_source" (the reference source view, slot 0, placed as the prediction of every target) and
   "untrained" (the same sampler and trained VAE with the denoiser at its random initialisation),
5. writes scenario_{1,2,3}/sheet.png (one row per target: sources | target pose | generated | ground truth)
   and metrics.json (per scenario and overall, the margins over copy-source, the timings).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

# The demo's VAE: a narrow three-block AutoencoderKL (downscale 4, so a 64x64 view is 16x16 latents, enough for
# the synthetic figures' limbs; SD's factor 8 would leave 8x8), and a pose guider with as many stages.
DEMO_VAE_CHANNELS = (16, 32, 32)
DEMO_VAE_GROUPS = 2
DEMO_POSE_GUIDER = (16, 32, 64)
SCENARIO_SOURCES = {1: [0], 2: [0], 3: [0, 1, 2]}      # slots holding source views (the grid of make_eval_example)
SCENARIO_TARGETS = {1: [3], 2: [1, 2, 3], 3: [3]}      # slots to generate
METRICS = ("ssim", "psnr", "l1")


@dataclass
class DemoConfig:
    num_persons: int = 64            # synthetic persons (test_fraction of them held out)
    poses_per_person: int = 8
    test_fraction: float = 0.15
    view: int = 64                   # view size (the grid is 2x)
    vae_steps: int = 1000
    vae_time_s: float = 0.0         # > 0: also stop the VAE pre-training after this many seconds (not reproducible)
    vae_batch: int = 16
    vae_crop: int = 32               # the VAE trains on random crops this size (0: whole views)
    vae_lr: float = 2e-3
    stage: int = 3
    train_steps: int = 1000
    train_batch: int = 4
    train_lr: float = 1e-3
    train_warmup: int = 50
    train_schedule: str = "cosine"   # "constant" or "cosine" (to 0.1 x train_lr at train_steps)
    eval_persons: int = 8            # held-out persons scored per scenario
    sample_steps: int = 20
    guidance: float = 1.0
    seed: int = 0


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def vae_config() -> dict:
    """The demo VAE's diffusers-style config (scaling_factor is fitted by the pre-training)."""
    from imagpose_jax.train.config import TINY_VAE
    n = len(DEMO_VAE_CHANNELS)
    return dict(TINY_VAE, block_out_channels=DEMO_VAE_CHANNELS, norm_num_groups=DEMO_VAE_GROUPS,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)


def train_config(dc: DemoConfig, data_dir: str, vae_folder: str, vae_config: dict):
    from imagpose_jax.train.config import base_config
    c = base_config(dc.stage, "tiny")
    c.vae = dict(vae_config)
    c.pose_guider_channels = DEMO_POSE_GUIDER
    c.seed = dc.seed
    c.steps = dc.train_steps
    c.data.path = data_dir
    c.data.height = c.data.width = dc.view
    c.data.batch_size = dc.train_batch
    c.data.synthetic.num_persons = dc.num_persons
    c.data.synthetic.poses_per_person = dc.poses_per_person
    c.data.synthetic.seed = dc.seed
    c.data.synthetic.test_fraction = dc.test_fraction
    c.init.vae = vae_folder
    c.optim.learning_rate = dc.train_lr
    c.optim.warmup_steps = dc.train_warmup
    c.optim.schedule = dc.train_schedule
    c.train.log_every = 50
    c.train.checkpoint_every = max(dc.train_steps, 1)
    c.train.async_checkpoint = False
    c.mesh.data = 1
    return c


def eval_batch(persons, scenario: int, view: int) -> tuple[dict, list[dict]]:
    """Sampler inputs (one grid per person) and the examples (their `grid` is the ground truth) for a scenario."""
    from imagpose_jax.data.batch import stack
    from imagpose_jax.data.pipeline import make_eval_example
    examples = [make_eval_example(p, scenario, view, view) for p in persons]
    return stack(examples), examples


def target_views(grids: np.ndarray, scenario: int) -> np.ndarray:
    """(B, 2H, 2W, 3) in [0, 1] -> the scenario's target slots, (B * targets, H, W, 3), person-major."""
    from imagpose_jax.data.grid import untile
    return np.stack([untile(g)[s] for g in grids for s in SCENARIO_TARGETS[scenario]])


def copy_source(examples: list[dict], scenario: int) -> np.ndarray:
    """The copy-source baseline: the reference source view (slot 0) as every target's prediction, in [0, 1]."""
    return np.stack([e["ref_pixels"] / 2 + 0.5 for e in examples for _ in SCENARIO_TARGETS[scenario]])


def score(pred: np.ndarray, truth: np.ndarray) -> dict:
    from imagpose_jax.metrics import evaluate_pairs
    return evaluate_pairs(np.clip(pred, 0, 1), np.clip(truth, 0, 1))


def sheet(examples: list[dict], scenario: int, generated: np.ndarray) -> np.ndarray:
    """One row per target: sources | target pose | generated | ground truth, uint8."""
    from imagpose_jax.data.grid import untile
    rows, k = [], 0
    for e in examples:
        views, poses = untile((e["grid"] + 1) / 2), untile(e["pose_grid"])
        for s in SCENARIO_TARGETS[scenario]:
            rows.append(np.concatenate([views[i] for i in SCENARIO_SOURCES[scenario]]
                                       + [poses[s], generated[k], views[s]], axis=1))
            k += 1
    return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255 + 0.5).astype(np.uint8)


def _summary(per: dict) -> dict:
    """Overall means over every scored target (weighted by the number of targets)."""
    n = sum(v["n"] for v in per.values())
    return {"n": n, **{m: sum(v[m] * v["n"] for v in per.values()) / n for m in METRICS}}


def evaluate(export: str, c, test_persons, dc: DemoConfig, out: str, log=None) -> dict:
    """Samples the three scenarios for `test_persons` with the exported weights and with the denoiser at its
    random initialisation; scores both and the copy-source baseline; writes the sheets and generated views."""
    import jax
    from flax import nnx
    from PIL import Image

    from imagpose_jax.models.imagpose import IMAGPose
    from imagpose_jax.models.init import ParamKeys
    from imagpose_jax.sampling.pipeline import load_pipeline_models
    from imagpose_jax.sampling.sampler import Sampler, SamplerConfig
    from imagpose_jax.train import config as tc

    trained, vae, dino = load_pipeline_models(export)
    untrained = IMAGPose(tc.model_config(c), rngs=ParamKeys(c.seed))
    sampler = Sampler(nnx.clone(trained), vae, dino, SamplerConfig(  # compiled once; each model's weights swapped in
        num_inference_steps=dc.sample_steps, guidance_scale=dc.guidance,
        scheduler_config={**SamplerConfig().scheduler_config, **c.noise.to_dict()}))
    results = {"trained": {}, "untrained": {}, "copy_source": {}}
    for n in (1, 2, 3):
        batch, examples = eval_batch(test_persons, n, dc.view)
        truth = target_views((batch.grid + 1) / 2, n)
        shape = (len(examples), *sampler.latent_shape(2 * dc.view, 2 * dc.view))
        noise = np.asarray(jax.random.normal(jax.random.key(dc.seed + n), shape))
        sampler.set_weights(trained, vae, dino)
        generated = target_views(sampler(batch, noise=noise), n)
        sampler.set_weights(untrained, vae, dino)
        baseline = target_views(sampler(batch, noise=noise), n)
        results["trained"][n] = score(generated, truth)
        results["untrained"][n] = score(baseline, truth)
        results["copy_source"][n] = score(copy_source(examples, n), truth)
        folder = os.path.join(out, f"scenario_{n}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(sheet(examples, n, generated)).save(os.path.join(folder, "sheet.png"))
        for j, image in enumerate(generated):
            Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(
                os.path.join(folder, f"generated_{j:03d}.png"))
        if log is not None:
            log(f"scenario {n}: " + ", ".join(f"{k} ssim {v[n]['ssim']:.4f} l1 {v[n]['l1']:.4f}" for k, v in results.items()))
    return results


def run(out: str, dc: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    from imagpose_jax.data.index import read_imagpose_json
    from imagpose_jax.data.synthetic import make_synthetic_dataset
    from imagpose_jax.train.loop import train
    from imagpose_jax.train.vae import load_views, reconstruct, save_vae, train_vae

    os.makedirs(out, exist_ok=True)
    timings, t_all = {}, time.perf_counter()

    t0 = time.perf_counter()
    data_dir = os.path.join(out, "data")
    files = make_synthetic_dataset(data_dir, num_persons=dc.num_persons, poses_per_person=dc.poses_per_person,
                                   height=dc.view, width=dc.view, seed=dc.seed, test_fraction=dc.test_fraction)
    train_persons = read_imagpose_json(files["train"].index_json)
    test_persons = [p for p in read_imagpose_json(files["test"].index_json) if len(p.views) >= 4][:dc.eval_persons]
    if not test_persons:
        raise ValueError("no held-out person with 4 views: raise num_persons / test_fraction / poses_per_person")
    timings["dataset_s"] = time.perf_counter() - t0
    _log(f"dataset: {len(train_persons)} training persons, {len(test_persons)} held-out persons scored "
         f"({timings['dataset_s']:.0f} s)")

    t0 = time.perf_counter()
    train_images = load_views([v.image for p in train_persons for v in p.views], dc.view, dc.view)
    vae, vae_cfg, vae_summary = train_vae(train_images, vae_config(), steps=dc.vae_steps, batch_size=dc.vae_batch,
                                          learning_rate=dc.vae_lr, crop=dc.vae_crop, seed=dc.seed,
                                          time_limit_s=dc.vae_time_s or None, log=_log if progress else None)
    vae_folder = os.path.join(out, "vae")
    save_vae(vae_folder, vae, vae_cfg)
    held = load_views([v.image for p in test_persons for v in p.views], dc.view, dc.view)
    vae_summary["held_out_reconstruction"] = score(reconstruct(vae, held), held / 2 + 0.5)
    timings["vae_s"] = time.perf_counter() - t0
    _log(f"VAE: {vae_summary['steps']} steps, held-out reconstruction {vae_summary['held_out_reconstruction']} "
         f"({timings['vae_s']:.0f} s)")
    del vae

    t0 = time.perf_counter()
    c = train_config(dc, data_dir, vae_folder, vae_cfg)
    workdir = os.path.join(out, "train")
    train_summary = train(c, workdir, progress=progress)
    timings["train_s"] = time.perf_counter() - t0
    _log(f"denoiser: {dc.train_steps} steps, final loss {train_summary['final_loss']} ({timings['train_s']:.0f} s)")

    t0 = time.perf_counter()
    results = evaluate(train_summary["export"], c, test_persons, dc, out, log=_log if progress else None)
    timings["sample_and_score_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all

    metrics = {"scenarios": {str(n): {k: results[k][n] for k in results} for n in (1, 2, 3)},
               "overall": {k: _summary(v) for k, v in results.items()}}
    metrics["margins"] = {
        scope: {"ssim_trained_minus_copy_source": m["trained"]["ssim"] - m["copy_source"]["ssim"],
                "l1_copy_source_minus_trained": m["copy_source"]["l1"] - m["trained"]["l1"],
                "psnr_trained_minus_copy_source": m["trained"]["psnr"] - m["copy_source"]["psnr"]}
        for scope, m in [("overall", metrics["overall"])] + [(f"scenario_{n}", metrics["scenarios"][str(n)])
                                                             for n in (1, 2, 3)]}
    metrics.update({
        "baselines": {"copy_source": "the reference source view (grid slot 0) placed as the prediction of every target",
                      "untrained": "the same sampler and trained VAE, denoiser at its random initialisation (seed "
                                   f"{c.seed})"},
        "held_out_persons": [p.name for p in test_persons],
        "metric_protocol": "SSIM: 51-pixel uniform window, data range 1; PSNR in dB; L1: mean absolute error in [0, 1]",
        "vae": vae_summary,
        "denoiser": {k: train_summary[k] for k in ("steps", "init_s", "first_step_s", "final_loss")},
        "config": asdict(dc),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    })
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="imagpose demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--seed", type=int, default=0)
    for field, default in asdict(DemoConfig()).items():
        if field != "seed":
            p.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    a = p.parse_args(argv)
    dc = DemoConfig(**{k: getattr(a, k) for k in asdict(DemoConfig())})
    m = run(a.out, dc)
    print(json.dumps({"overall": m["overall"], "margins": m["margins"]["overall"], "timings": m["timings"]}, indent=1))
    print(f"sheets: {a.out}/scenario_{{1,2,3}}/sheet.png; metrics: {a.out}/metrics.json")
    return 0
