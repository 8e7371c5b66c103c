"""`imagpose demo`: the whole system on an embedded default, offline, on the CPU.

1. writes the synthetic pose-transfer dataset (data/),
2. writes random-weight checkpoints in the original on-disk formats (random_ckpt/: torch .pth, diffusers VAE,
   transformers DINOv2) and converts them with the strict converter (weights/),
3. generates the three scenarios for a held-out person (scenario_{1,2,3}/: target PNGs and sheet.png),
4. writes summary.json (what ran, the timings).
The weights are untrained, so the images show noise-like texture: this run proves the wiring, not the model.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def run(out: str, seed: int = 0, steps: int = 10, view: int = 64) -> dict:
    import numpy as np
    from PIL import Image

    from convert_weights.cli import main as convert_main
    from convert_weights.random_weights import write_random_checkpoints
    from imagpose_jax.data.index import read_imagpose_json
    from imagpose_jax.data.synthetic import make_synthetic_dataset
    from imagpose_jax.sampling.pipeline import IMAGPosePipeline, make_sheet
    from imagpose_jax.sampling.sampler import SamplerConfig

    timings, t0 = {}, time.perf_counter()
    files = make_synthetic_dataset(os.path.join(out, "data"), num_persons=8, poses_per_person=6, height=view,
                                   width=view, seed=seed, test_fraction=0.25)
    timings["dataset_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt = os.path.join(out, "random_ckpt")
    write_random_checkpoints(ckpt, "tiny", seed)
    convert_main(["pipeline", "--unet", f"{ckpt}/denoising_unet-0.pth", "--pose-guider", f"{ckpt}/pose_guider-0.pth",
                  "--patch", f"{ckpt}/patch-0.pth", "--vae", f"{ckpt}/vae", "--image-encoder", f"{ckpt}/image_encoder",
                  "--config", f"{ckpt}/config.json", "--out", os.path.join(out, "weights")])
    timings["checkpoints_s"] = time.perf_counter() - t0

    person = read_imagpose_json(files["test"].index_json)[0]
    views = person.views
    pipe = IMAGPosePipeline.from_pretrained(os.path.join(out, "weights"), SamplerConfig(num_inference_steps=steps))
    scenarios = {1: (views[:1], views[3:4]), 2: (views[:1], views[3:6]), 3: (views[:3], views[3:4])}
    summary = {"person": person.name, "view_size": [view, view], "steps": steps, "scenarios": {}}
    for n, (src, tgt) in scenarios.items():
        t0 = time.perf_counter()
        res = pipe([v.image for v in src], [v.pose_image for v in src], [v.pose_image for v in tgt],
                   view_size=(view, view), seed=seed, progress=False)
        seconds = time.perf_counter() - t0
        folder = os.path.join(out, f"scenario_{n}")
        os.makedirs(folder, exist_ok=True)
        load = lambda p: np.asarray(Image.open(p).convert("RGB").resize((view, view)), np.float32) / 255  # noqa: E731
        for j, image in enumerate(res.targets):
            Image.fromarray((image * 255 + 0.5).astype(np.uint8)).save(os.path.join(folder, f"target_{j:03d}.png"))
        sheet = make_sheet([load(v.image) for v in src], [load(v.pose_image) for v in tgt], res.targets)
        Image.fromarray(sheet).save(os.path.join(folder, "sheet.png"))
        summary["scenarios"][n] = {"sources": len(src), "targets": len(tgt), "grids": len(res.grids),
                                   "seconds_incl_compile": round(seconds, 2)}
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="imagpose demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    summary = run(a.out, a.seed, a.steps)
    print(json.dumps(summary, indent=1))
    print(f"sheets: {a.out}/scenario_{{1,2,3}}/sheet.png")
    return 0
