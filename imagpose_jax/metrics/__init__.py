"""Evaluation metrics for pose transfer (images in [0, 1], (B, H, W, 3)).

- `ssim`, `psnr`, `l1`, `mse`: pixel metrics (SSIM as scikit-image computes it, 51-pixel window by default);
- `LPIPS`, `load_lpips`, `lpips_distance` (jitted, batched): LPIPS v0.1 (VGG or AlexNet) from the user's
  torchvision and lpips weight files;
- `InceptionV3`, `load_inception`, `inception_features` (jitted, batched), `activation_statistics`,
  `frechet_distance`, `fid_from_features`: FID with pytorch-fid's Inception (or torchvision's) from the
  user's weight file;
- `evaluate_pairs` (means), `pair_metrics` (per pair): all of them over a set of (generated, target) pairs;
- `folders.evaluate_folders` (`imagpose evaluate`): the DeepFashion protocol over two folders of images.
"""
from imagpose_jax.metrics.evaluate import evaluate_pairs, pair_metrics
from imagpose_jax.metrics.fid import (InceptionV3, activation_statistics, fid_from_features, frechet_distance,
                                      inception_features, load_inception)
from imagpose_jax.metrics.image import l1, mse, psnr, ssim
from imagpose_jax.metrics.lpips import LPIPS, load_lpips, lpips_distance

__all__ = ["ssim", "psnr", "l1", "mse", "LPIPS", "load_lpips", "lpips_distance", "InceptionV3", "load_inception",
           "inception_features", "activation_statistics", "frechet_distance", "fid_from_features", "evaluate_pairs",
           "pair_metrics"]
