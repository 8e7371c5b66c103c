"""The weight converter at full size: wall time and peak memory of `imagpose-convert` on random checkpoints.

  python -m benchmarks.converter                      # both conversions below, in a temporary folder
  python -m benchmarks.converter --which pipeline --workdir /big/disk/tmp

- "pipeline": the full IMAGPose checkpoint set as the original writes it (denoising_unet-0.pth with the 21 CVA
  modules, pose_guider-0.pth, patch-0.pth), a diffusers SD1.5 VAE and a transformers DINOv2-base folder
  (`convert_weights.random_weights`, size sd15) -> `imagpose-convert pipeline` (an inference folder);
- "sd15": a diffusers SD1.5 UNet folder plus a full-size motion module (`convert_weights.random_sd15`, the
  slow test's inputs) -> `imagpose-convert sd15` (the stage-2 training initialisation).
Each conversion runs as its own process (`python -m convert_weights ...`, as a user would run it); its wall time
and peak resident memory (the child's own ru_maxrss, from wait4) are recorded, with the input and output sizes.
The checkpoints are written by separate processes first (not timed). Needs about 25 GB of free disk.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, table, write_result
from imagpose_jax.checkpoint.folder import PipelineFolder

ROOT = Path(__file__).resolve().parent.parent


def run_measured(cmd: list[str]) -> dict:
    """Runs `cmd`; its wall time and its own peak RSS (GiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise subprocess.CalledProcessError(code, cmd)
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20}


def size_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", default="pipeline,sd15", help="comma-separated: pipeline, sd15")
    p.add_argument("--size", default="sd15", choices=("sd15", "tiny"), help="tiny: smoke-test the script (pipeline only)")
    p.add_argument("--workdir", help="where to write the checkpoints (default: a temporary folder, removed after)")
    p.add_argument("--out", help="result JSON (default benchmarks/results/converter.json)")
    a = p.parse_args(argv)

    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        for which in a.which.split(","):
            src, dst = tmp / f"{which}_src", tmp / f"{which}_out"
            if which == "pipeline":
                write = [py, "-m", "convert_weights.random_weights", "--size", a.size, "--out", str(src)]
                convert = [py, "-m", "convert_weights", "pipeline", "--unet", str(src / "denoising_unet-0.pth"),
                           "--pose-guider", str(src / "pose_guider-0.pth"), "--patch", str(src / "patch-0.pth"),
                           "--vae", PipelineFolder(src).vae, "--image-encoder", PipelineFolder(src).image_encoder,
                           "--config", str(src / "config.json"), "--out", str(dst)]
            elif which == "sd15":
                if a.size != "sd15":
                    continue
                write = [py, "-c", "import sys; from convert_weights.random_sd15 import write_sd15_unet_and_motion_module"
                                   " as w; w(sys.argv[1])", str(src)]
                convert = [py, "-m", "convert_weights", "sd15", "--unet-dir", str(src / "unet"),
                           "--motion-module", str(src / "mm.ckpt"), "--out", str(dst)]
            else:
                raise SystemExit(f"unknown conversion {which!r}")
            print(f"[{which}] writing random {a.size} checkpoints ...", flush=True)
            w = run_measured(write)
            print(f"[{which}] converting ...", flush=True)
            r = run_measured(convert)
            rows.append({"conversion": which, "size": a.size, "input_gib": round(size_gib(src), 2),
                         "output_gib": round(size_gib(dst), 2), "seconds": r["seconds"],
                         "peak_rss_gib": r["peak_rss_gib"], "write_seconds": w["seconds"]})
            print(table(rows[-1:], ["conversion", "size", "input_gib", "output_gib", "seconds", "peak_rss_gib"]), flush=True)
            for d in (src, dst):
                subprocess.run(["rm", "-rf", str(d)], check=False)

    print("\n" + table(rows, ["conversion", "size", "input_gib", "output_gib", "seconds", "peak_rss_gib"]))
    write_result("converter" + ("" if a.size == "sd15" else f"_{a.size}"),
                 {"benchmark": "converter", "rows": rows, "machine": machine_info()}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
