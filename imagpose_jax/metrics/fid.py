"""FID: the InceptionV3 pool features (2048-d) in Flax NNX, with a strict loader, and the Fréchet distance.

`InceptionV3(images)` is pytorch-fid's `InceptionV3(output_blocks=[3])`: (B, H, W, 3) images in [0, 1] are
resized to 299x299 (bilinear, align_corners=False, no antialiasing: `F.interpolate`), scaled to [-1, 1]
and run through torchvision's `Inception3` trunk up to the final average pool -> (B, 2048). There is no
ImageNet `transform_input` (pytorch-fid does not apply it either).

Two block variants (`variant`), with identical parameters:
- "fid": pytorch-fid's `FIDInceptionA/C/E_1/E_2`, the TensorFlow graph that FID numbers are computed
  with (the `pt_inception-2015-12-05-6726825d.pth` weights): average pools exclude the padding, and
  `Mixed_7c` max-pools its pool branch;
- "torchvision": torchvision's `inception_v3` blocks (average pools count the padding), for
  `inception_v3_google-0cc3c7bd.pth`.
`load_inception(path)` picks the variant from the classifier size (1008 classes: the TF graph, "fid";
1000: torchvision) unless told. Loading is strict: `fc.*` (classifier), `AuxLogits.*` (auxiliary head)
and `*.num_batches_tracked` (a training counter) are deliberately skipped; every other key must fill a
parameter. Parameter paths mirror the PyTorch keys (`Mixed_5b.branch1x1.conv.kernel` <-> `.conv.weight`,
`.bn.scale/bias/mean/var` <-> `.bn.weight/bias/running_mean/running_var`).

The Fréchet distance follows pytorch-fid's `calculate_frechet_distance` (float64, `scipy.linalg.sqrtm`,
the eps-offset retry, the imaginary-part check) and its statistics (`np.mean`, `np.cov(rowvar=False)`).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagpose_jax.metrics.image import as_images

HIGHEST = jax.lax.Precision.HIGHEST
VARIANTS = ("fid", "torchvision")
INPUT_SIZE = 299
MIN_SIZE = 75  # the smallest input the trunk accepts (torchvision's `min_size`), with resize_input=False


# ----------------------------------------------------------------------------------------------
# Pools (NHWC), with PyTorch's padding semantics.

def max_pool(x: jax.Array, k: int, stride: int, pad: int = 0) -> jax.Array:
    p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1), p)


def avg_pool_3x3(x: jax.Array, count_include_pad: bool) -> jax.Array:
    """`F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=...)`."""
    p = ((0, 0), (1, 1), (1, 1), (0, 0))
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
    if count_include_pad:
        return s / 9.0
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    return s / jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)


@functools.lru_cache(maxsize=16)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of `F.interpolate(mode='bilinear', align_corners=False)` along one axis,
    computed in float32 as PyTorch does (scale = n_in / n_out, negative source coordinates clamped to 0)."""
    scale = np.float32(n_in / n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.floor(src).astype(np.int64)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    i1 = np.minimum(i0 + 1, n_in - 1)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), np.float32(1) - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    return jnp.einsum("ih,bhwc,jw->bijc", bilinear_matrix(h, size[0]), x, bilinear_matrix(w, size[1]),
                      precision=HIGHEST)


# ----------------------------------------------------------------------------------------------
# The network (names as torchvision's `Inception3`).

def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, *, stride=1, padding=0, rngs, precision=HIGHEST):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(cin, cout, _pair(kernel_size), strides=_pair(stride), padding=((ph, ph), (pw, pw)),
                             use_bias=False, precision=precision, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, use_fast_variance=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, *, fid: bool, rngs, precision=HIGHEST):
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        self.fid = fid
        self.branch1x1 = c(cin, 64, 1)
        self.branch5x5_1 = c(cin, 48, 1)
        self.branch5x5_2 = c(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = c(cin, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, padding=1)
        self.branch_pool = c(cin, pool_features, 1)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3(x, count_include_pad=not self.fid))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, cin: int, *, rngs, precision=HIGHEST):
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        self.branch3x3 = c(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = c(cin, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, channels_7x7: int, *, fid: bool, rngs, precision=HIGHEST):
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        c7 = channels_7x7
        self.fid = fid
        self.branch1x1 = c(cin, 192, 1)
        self.branch7x7_1 = c(cin, c7, 1)
        self.branch7x7_2 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = c(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = c(cin, c7, 1)
        self.branch7x7dbl_2 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = c(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = c(cin, 192, 1)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        bp = self.branch_pool(avg_pool_3x3(x, count_include_pad=not self.fid))
        return jnp.concatenate([self.branch1x1(x), b7, d, bp], axis=-1)


class InceptionD(nnx.Module):
    def __init__(self, cin: int, *, rngs, precision=HIGHEST):
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        self.branch3x3_1 = c(cin, 192, 1)
        self.branch3x3_2 = c(192, 320, 3, stride=2)
        self.branch7x7x3_1 = c(cin, 192, 1)
        self.branch7x7x3_2 = c(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = c(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = c(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
    """`pool`: "avg" (torchvision), "avg_exclude_pad" (FIDInceptionE_1) or "max" (FIDInceptionE_2)."""

    def __init__(self, cin: int, *, pool: str, rngs, precision=HIGHEST):
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        self.pool = pool
        self.branch1x1 = c(cin, 320, 1)
        self.branch3x3_1 = c(cin, 384, 1)
        self.branch3x3_2a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = c(cin, 448, 1)
        self.branch3x3dbl_2 = c(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = c(cin, 192, 1)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=-1)
        if self.pool == "max":
            p = max_pool(x, 3, 1, pad=1)
        else:
            p = avg_pool_3x3(x, count_include_pad=self.pool == "avg")
        return jnp.concatenate([self.branch1x1(x), b3, d, self.branch_pool(p)], axis=-1)


class InceptionV3(nnx.Module):
    """`InceptionV3(variant, rngs=...)(images)` -> (B, 2048) pool features; images (B, H, W, 3) in [0, 1].

    Construct with `load_inception` (weights from a file); a bare module has random weights.
    """

    def __init__(self, variant: str = "fid", *, rngs, precision=HIGHEST):
        if variant not in VARIANTS:
            raise ValueError(f"Inception variant must be one of {VARIANTS}, got {variant!r}")
        fid = variant == "fid"
        c = functools.partial(BasicConv2d, rngs=rngs, precision=precision)
        kw = dict(rngs=rngs, precision=precision)
        self.variant = variant
        self.Conv2d_1a_3x3 = c(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = c(32, 32, 3)
        self.Conv2d_2b_3x3 = c(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = c(64, 80, 1)
        self.Conv2d_4a_3x3 = c(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, fid=fid, **kw)
        self.Mixed_5c = InceptionA(256, 64, fid=fid, **kw)
        self.Mixed_5d = InceptionA(288, 64, fid=fid, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, fid=fid, **kw)
        self.Mixed_6c = InceptionC(768, 160, fid=fid, **kw)
        self.Mixed_6d = InceptionC(768, 160, fid=fid, **kw)
        self.Mixed_6e = InceptionC(768, 192, fid=fid, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, pool="avg_exclude_pad" if fid else "avg", **kw)
        self.Mixed_7c = InceptionE(2048, pool="max" if fid else "avg", **kw)

    def __call__(self, images, *, resize_input: bool = True, check_range: bool = True) -> jax.Array:
        x, single = as_images(images, "images", check_range=check_range)
        if x.shape[-1] != 3:
            raise ValueError(f"Inception expects RGB images (3 channels), got {x.shape[-1]}")
        if resize_input:
            x = resize_bilinear(x.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
        elif min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"Inception needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels "
                             f"(or resize_input=True), got {x.shape[1]}x{x.shape[2]}")
        x = 2 * x.astype(jnp.float32) - 1
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = max_pool(x, 3, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool(x, 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        feats = x.mean(axis=(1, 2))
        return feats[0] if single else feats


def inception_features(model: InceptionV3, images, *, batch_size: int = 16, resize_input: bool = True) -> np.ndarray:
    """(N, 2048) pool features of (N, H, W, 3) images in [0, 1], jitted and batched."""
    from imagpose_jax.metrics.batching import apply_batched
    x, single = as_images(images, "images")
    f = apply_batched(model, (x,), batch_size, resize_input=resize_input)
    return f[0] if single else f


# ----------------------------------------------------------------------------------------------
# Loading.

CLASSES_TO_VARIANT = {1008: "fid", 1000: "torchvision"}
BN_RENAMES = (("mean", "running_mean"), ("var", "running_var"))


def load_inception(path: str | os.PathLike, variant: str = "auto", *, precision=HIGHEST) -> InceptionV3:
    """InceptionV3 from a PyTorch state dict: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` or
    torchvision's `inception_v3_google-0cc3c7bd.pth` (or any `Inception3` state dict).

    `variant="auto"` reads it from `fc.weight` (1008 rows: "fid", 1000: "torchvision"). Strict: raises
    ConversionError naming every missing, unexpected or mis-shaped key.
    """
    from convert_weights.core import ConversionError, Skip, load_torch_file, torch_to_nnx
    from imagpose_jax.models.init import abstract

    path = os.fspath(path)
    sd = load_torch_file(path)
    if variant == "auto":
        fc = sd.get("fc.weight")
        if fc is None or fc.shape[0] not in CLASSES_TO_VARIANT:
            raise ConversionError(
                f"{path}: cannot tell the Inception variant (fc.weight is "
                f"{'missing' if fc is None else tuple(fc.shape)}); pass variant='fid' or 'torchvision'")
        variant = CLASSES_TO_VARIANT[fc.shape[0]]
    elif "fc.weight" in sd and CLASSES_TO_VARIANT.get(sd["fc.weight"].shape[0], variant) != variant:
        raise ConversionError(f"{path}: variant={variant!r} but fc.weight {tuple(sd['fc.weight'].shape)} is the "
                              f"{CLASSES_TO_VARIANT[sd['fc.weight'].shape[0]]!r} Inception's (FID would be wrong)")
    model = abstract(lambda k: InceptionV3(variant, rngs=k, precision=precision))
    state = torch_to_nnx(nnx.state(model), sd, renames=BN_RENAMES, source=path, skip=[
        Skip(r"^fc\.", "ImageNet classifier: FID uses the 2048-d pool features"),
        Skip(r"^AuxLogits\.", "auxiliary classifier (training only)"),
        Skip(r"\.num_batches_tracked$", "BatchNorm training counter")])
    nnx.update(model, state)
    return model


# ----------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance (float64 numpy, as pytorch-fid).

def activation_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), covariance (D, D)), float64: `np.mean(axis=0)`, `np.cov(rowvar=False)`."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"FID statistics need (N, D) features with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as pytorch-fid computes it."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match the means {mu1.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # pytorch-fid passes disp=False (removed in SciPy 1.18): same value
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 sigma2) has a large imaginary component "
                             f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1, features2) -> float:
    """FID between two sets of (N, D) Inception features."""
    return frechet_distance(*activation_statistics(features1), *activation_statistics(features2))
