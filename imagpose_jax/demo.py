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

import json
import os
import time

import numpy as np

from imagpose_jax.data.grid import SCENARIOS

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
METRICS = ("ssim", "psnr", "l1")


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def source_slots(scenario: int) -> list[int]:
    """The slots showing each source once (a repeated source at its first slot)."""
    return [slot for slot, _ in SCENARIOS[scenario].sources()]


def target_slots(scenario: int) -> list[int]:
    return [slot for slot, _ in SCENARIOS[scenario].targets()]


def eval_batch(persons, scenario: int, view: int):
    """Sampler inputs (one grid per person) and the examples (their `grid` is the ground truth) for a scenario."""
    from imagpose_jax.data.batch import stack
    from imagpose_jax.data.pipeline import make_eval_example
    examples = [make_eval_example(p, scenario, view, view) for p in persons]
    return stack(examples), examples


def target_views(grids: np.ndarray, scenario: int) -> np.ndarray:
    """(B, 2H, 2W, 3) in [0, 1] -> the scenario's target slots, (B * targets, H, W, 3), person-major."""
    from imagpose_jax.data.grid import untile
    return np.stack([untile(g)[s] for g in grids for s in target_slots(scenario)])


def copy_source(examples: list[dict], scenario: int) -> np.ndarray:
    """The copy-source baseline: the reference source view (slot 0) as every target's prediction, in [0, 1]."""
    return np.stack([e["ref_pixels"] / 2 + 0.5 for e in examples for _ in target_slots(scenario)])


def score(pred: np.ndarray, truth: np.ndarray) -> dict:
    from imagpose_jax.metrics import evaluate_pairs
    return evaluate_pairs(np.clip(pred, 0, 1), np.clip(truth, 0, 1))


def sheet(examples: list[dict], scenario: int, generated: np.ndarray) -> np.ndarray:
    """One row per target: sources | target pose | generated | ground truth, uint8."""
    from imagpose_jax.data.grid import untile
    from imagpose_jax.images import contact_sheet
    rows, k = [], 0
    for e in examples:
        views, poses = untile((e["grid"] + 1) / 2), untile(e["pose_grid"])
        for s in target_slots(scenario):
            rows.append([views[i] for i in source_slots(scenario)] + [poses[s], generated[k], views[s]])
            k += 1
    return contact_sheet(rows)


def _summary(per: dict) -> dict:
    """Overall means over every scored target (weighted by the number of targets)."""
    n = sum(v["n"] for v in per.values())
    return {"n": n, **{m: sum(v[m] * v["n"] for v in per.values()) / n for m in METRICS}}


def evaluate(export: str, c, test_persons, out: str, log=None) -> dict:
    """Generates the three scenarios for `test_persons` through `IMAGPosePipeline` with the exported weights and
    with the denoiser at its random initialisation (seed `c.seed`); scores both and the copy-source baseline;
    writes the sheets and generated views."""
    from imagpose_jax.images import save_image
    from imagpose_jax.models.imagpose import IMAGPose
    from imagpose_jax.models.init import concrete
    from imagpose_jax.sampling.pipeline import IMAGPosePipeline, load_pipeline_models
    from imagpose_jax.sampling.sampler import SamplerConfig
    from imagpose_jax.train import config as tc

    d, view = c.demo, c.data.height
    trained, vae, dino = load_pipeline_models(export)
    untrained = concrete(lambda k: IMAGPose(tc.model_config(c), rngs=k), seed=c.seed)
    pipe = IMAGPosePipeline(trained, vae, dino, SamplerConfig(  # compiled once; each model's weights swapped in
        num_inference_steps=d.sample_steps, guidance_scale=d.guidance,
        scheduler_config={**SamplerConfig().scheduler_config, **c.noise.to_dict()}))
    results = {"trained": {}, "untrained": {}, "copy_source": {}}
    for n in SCENARIOS:
        batch, examples = eval_batch(test_persons, n, view)
        truth = target_views((batch.grid + 1) / 2, n)
        pipe.set_weights(trained, vae, dino)
        generated = target_views(pipe.generate_grids(batch, seed=c.seed + n, batch_size=len(examples), progress=False), n)
        pipe.set_weights(untrained, vae, dino)
        baseline = target_views(pipe.generate_grids(batch, seed=c.seed + n, batch_size=len(examples), progress=False), n)
        results["trained"][n] = score(generated, truth)
        results["untrained"][n] = score(baseline, truth)
        results["copy_source"][n] = score(copy_source(examples, n), truth)
        folder = os.path.join(out, f"scenario_{n}")
        os.makedirs(folder, exist_ok=True)
        save_image(os.path.join(folder, "sheet.png"), sheet(examples, n, generated))
        for j, image in enumerate(generated):
            save_image(os.path.join(folder, f"generated_{j:03d}.png"), image)
        if log is not None:
            log(f"scenario {n}: " + ", ".join(f"{k} ssim {v[n]['ssim']:.4f} l1 {v[n]['l1']:.4f}" for k, v in results.items()))
    return results


def run(out: str, c=None, progress: bool = True) -> dict:
    """The demo with config `c` (default: configs/demo.py) into the folder `out`; returns metrics.json's content."""
    from imagpose_jax.data.index import read_imagpose_json
    from imagpose_jax.data.synthetic import make_synthetic_dataset
    from imagpose_jax.train.config import load_config
    from imagpose_jax.train.loop import train
    from imagpose_jax.train.vae import load_views, reconstruct, save_vae, train_vae

    c = load_config(DEFAULT_CONFIG) if c is None else c
    d, syn, view = c.demo, c.data.synthetic, c.data.height
    if c.data.width != view:
        raise ValueError(f"the demo's views are square: data.height {view} != data.width {c.data.width}")
    os.makedirs(out, exist_ok=True)
    timings, t_all = {}, time.perf_counter()

    t0 = time.perf_counter()
    data_dir = os.path.join(out, "data")
    files = make_synthetic_dataset(data_dir, num_persons=syn.num_persons, poses_per_person=syn.poses_per_person,
                                   height=view, width=view, seed=syn.seed, test_fraction=syn.test_fraction)
    train_persons = read_imagpose_json(files["train"].index_json)
    test_persons = [p for p in read_imagpose_json(files["test"].index_json) if len(p.views) >= 4][:d.eval_persons]
    if not test_persons:
        raise ValueError("no held-out person with 4 views: raise num_persons / test_fraction / poses_per_person")
    timings["dataset_s"] = time.perf_counter() - t0
    _log(f"dataset: {len(train_persons)} training persons, {len(test_persons)} held-out persons scored "
         f"({timings['dataset_s']:.0f} s)")

    t0 = time.perf_counter()
    train_images = load_views([v.image for p in train_persons for v in p.views], view, view)
    vae, vae_cfg, vae_summary = train_vae(train_images, c.vae.to_dict(), steps=d.vae_steps, batch_size=d.vae_batch,
                                          learning_rate=d.vae_lr, crop=d.vae_crop, seed=c.seed,
                                          time_limit_s=d.vae_time_s or None, log=_log if progress else None)
    vae_folder = os.path.join(out, "vae")
    save_vae(vae_folder, vae, vae_cfg)
    held = load_views([v.image for p in test_persons for v in p.views], view, view)
    vae_summary["held_out_reconstruction"] = score(reconstruct(vae, held), held / 2 + 0.5)
    timings["vae_s"] = time.perf_counter() - t0
    _log(f"VAE: {vae_summary['steps']} steps, held-out reconstruction {vae_summary['held_out_reconstruction']} "
         f"({timings['vae_s']:.0f} s)")
    del vae

    t0 = time.perf_counter()
    c = c.copy_and_resolve_references()
    with c.unlocked():
        c.vae = dict(vae_cfg)             # with the scaling factor the pre-training fitted
    c.data.path, c.init.vae = data_dir, vae_folder
    train_summary = train(c, os.path.join(out, "train"), progress=progress)
    timings["train_s"] = time.perf_counter() - t0
    _log(f"denoiser: {c.steps} steps, final loss {train_summary['final_loss']} ({timings['train_s']:.0f} s)")

    t0 = time.perf_counter()
    results = evaluate(train_summary["export"], c, test_persons, out, log=_log if progress else None)
    timings["sample_and_score_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all

    metrics = {"scenarios": {str(n): {k: results[k][n] for k in results} for n in SCENARIOS},
               "overall": {k: _summary(v) for k, v in results.items()}}
    metrics["margins"] = {
        scope: {"ssim_trained_minus_copy_source": m["trained"]["ssim"] - m["copy_source"]["ssim"],
                "l1_copy_source_minus_trained": m["copy_source"]["l1"] - m["trained"]["l1"],
                "psnr_trained_minus_copy_source": m["trained"]["psnr"] - m["copy_source"]["psnr"]}
        for scope, m in [("overall", metrics["overall"])] + [(f"scenario_{n}", metrics["scenarios"][str(n)])
                                                             for n in SCENARIOS]}
    metrics.update({
        "baselines": {"copy_source": "the reference source view (grid slot 0) placed as the prediction of every target",
                      "untrained": "the same sampler and trained VAE, denoiser at its random initialisation (seed "
                                   f"{c.seed})"},
        "held_out_persons": [p.name for p in test_persons],
        "metric_protocol": "SSIM: 51-pixel uniform window, data range 1; PSNR in dB; L1: mean absolute error in [0, 1]",
        "vae": vae_summary,
        "denoiser": {k: train_summary[k] for k in ("steps", "init_s", "first_step_s", "final_loss")},
        "config": json.loads(c.to_json_best_effort()),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    })
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def main(argv=None) -> int:
    """`imagpose demo --out DIR [--config configs/demo.py] [--config.KEY=VALUE ...]` (ml-collections' config_flags)."""
    import sys
    from absl import flags
    from imagpose_jax.train.config import config_flag_values
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nflags: --out DIR (default outputs/demo) [--config configs/demo.py] [--config.KEY=VALUE ...]"
              f"\nthe config: {DEFAULT_CONFIG}")
        return 0
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", DEFAULT_CONFIG, *argv]
    try:
        fv = config_flag_values(argv, lambda fv: flags.DEFINE_string("out", "outputs/demo", "output folder",
                                                                     flag_values=fv), prog="imagpose demo")
    except (flags.Error, FileNotFoundError, ValueError, AttributeError, KeyError) as err:
        raise SystemExit(f"imagpose demo: error: {err}") from None
    m = run(fv.out, fv.config)
    print(json.dumps({"overall": m["overall"], "margins": m["margins"]["overall"], "timings": m["timings"]}, indent=1))
    print(f"sheets: {fv.out}/scenario_{{1,2,3}}/sheet.png; metrics: {fv.out}/metrics.json")
    return 0
