"""The SD1.5-size model: abstract shapes and parameter counts (fast), and a full-size conversion (slow)."""
from __future__ import annotations

import resource
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from imagpose_jax.models.imagpose import IMAGPose, IMAGPoseConfig
from imagpose_jax.models.init import abstract
from imagpose_jax.models.unet import UNet
from imagpose_jax.models.unet_config import UNetConfig


def _count(state, where=lambda p: True) -> int:
    return sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(state) if where(".".join(map(str, p))))


def test_full_size_parameter_counts():
    """SD1.5 + CVA as the original counts it (`unet.parameters()`): 1,312,744,644, of them 453,209,280 CVA."""
    model = abstract(lambda k: IMAGPose(IMAGPoseConfig(), rngs=k))
    unet = nnx.state(model.unet, nnx.Param)
    assert _count(unet) == 1_312_744_644
    assert _count(unet, lambda k: "motion_modules" in k) == 453_209_280
    assert sum(1 for p, _ in nnx.to_flat_state(unet) if p[-1] == "kernel" and "motion_modules" in p and "proj_out" in p) == 21
    stage1 = nnx.state(abstract(lambda k: UNet(UNetConfig(), rngs=k)), nnx.Param)
    assert _count(stage1) == 859_520_964 + 5 * 9 * 320  # SD1.5's UNet with conv_in widened from 4 to 9 channels
    assert model.pose_guider.conv_out.kernel.shape == (3, 3, 256, 320)  # added after conv_in's 320 channels


@pytest.mark.slow
def test_convert_full_size_sd15_and_motion_module(tmp_path):
    """A full-size random SD1.5 UNet written by diffusers plus a full-size motion module -> our params.
    Prints the conversion's wall time and peak resident memory (measured in a child process)."""
    import torch
    from diffusers import UNet2DConditionModel

    from convert_weights.core import save_torch_file, to_torch_layout, torch_key
    from convert_weights.imagpose import UNET_RENAMES

    torch.manual_seed(0)
    UNet2DConditionModel(cross_attention_dim=768, sample_size=64).save_pretrained(tmp_path / "unet")
    shapes = nnx.state(abstract(lambda k: UNet(UNetConfig(use_cva=True), rngs=k)), nnx.Param)
    rng = np.random.default_rng(0)
    mm = {torch_key(p, UNET_RENAMES): to_torch_layout(str(p[-1]), rng.standard_normal(v.shape, np.float32) * 0.02)
          for p, v in nnx.to_flat_state(shapes) if "motion_modules" in p}
    save_torch_file(mm, tmp_path / "mm.ckpt")
    del mm
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "convert_weights", "sd15", "--unet-dir", str(tmp_path / "unet"),
                    "--motion-module", str(tmp_path / "mm.ckpt"), "--out", str(tmp_path / "out")], check=True)
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    size_gib = (tmp_path / "out" / "params.safetensors").stat().st_size / 2**30
    print(f"full-size SD1.5 + motion module -> params: {seconds:.1f}s, peak RSS {peak_gib:.2f} GiB, output {size_gib:.2f} GiB")
    from imagpose_jax.checkpoint.params import load_params
    full = nnx.state(abstract(lambda k: IMAGPose(IMAGPoseConfig(), rngs=k)), nnx.Param)
    loaded = load_params(tmp_path / "out", full)
    assert _count(loaded["unet"]) == 1_312_744_644
