"""Pixel metrics for pose transfer: SSIM (scikit-image semantics), PSNR and L1, batched and jit-able.

Images are float arrays in [0, 1], (B, H, W, C) (or one (H, W, C) image); every function returns one value
per image, shape (B,) (a scalar for a single image).

SSIM is `skimage.metrics.structural_similarity(x, y, channel_axis=-1, data_range=1, win_size=51)` by
default: the DeepFashion pose-transfer protocol. With skimage's own defaults for everything else, that is
- uniform window (`gaussian_weights=False`): box means over 51 x 51 pixels (scipy `uniform_filter`);
- `use_sample_covariance=True`: (co)variances scaled by NP / (NP - 1), NP = 51 ** 2;
- `K1=0.01`, `K2=0.03`, so C1 = (0.01 * data_range) ** 2, C2 = (0.03 * data_range) ** 2;
- the SSIM map is averaged over the interior only (a (win_size - 1) // 2 border is cropped), separately
  for each channel, and the channel means are averaged.
`ssim(..., gaussian_weights=True, use_sample_covariance=False, win_size=None)` is the Wang et al. variant
that PATN/PIDM-style evaluation code passes to skimage: an 11-tap Gaussian (sigma=1.5, truncate=3.5, scipy's
'reflect' boundary) and a 5-pixel crop (`win_size=None` -> 2 * int(3.5 * sigma + 0.5) + 1, skimage's rule).
SSIM is invariant to a common scale: SSIM(x / 255, y / 255, data_range=1) = SSIM(x, y, data_range=255).

The filters are banded matrices applied with HIGHEST-precision einsums (float32 throughout), so the result
matches skimage's float64 computation to ~1e-6.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
SSIM_WIN_SIZE = 51
GAUSSIAN_TRUNCATE = 3.5  # skimage's value for gaussian_weights=True (an 11-tap filter at sigma=1.5)


# ----------------------------------------------------------------------------------------------
# Input checks (shared with the LPIPS and FID modules).

def as_images(x, name: str = "images", *, check_range: bool = True) -> tuple[jax.Array, bool]:
    """-> ((B, H, W, C) float array, whether the input was a single (H, W, C) image).

    Raises ValueError naming the problem: wrong rank, non-float dtype (uint8 images: divide by 255),
    values outside [0, 1] (checked when the values are concrete, i.e. not under jit)."""
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"{name}: expected (B, H, W, C) or (H, W, C) images, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}: expected float images in [0, 1], got dtype {x.dtype}"
                         + (" (divide uint8 images by 255)" if x.dtype == np.uint8 else ""))
    if check_range and not isinstance(x, jax.core.Tracer) and x.size:
        lo, hi = float(x.min()), float(x.max())
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"{name}: values must lie in [0, 1], got min {lo:.6g}, max {hi:.6g}"
                             + (" (images in [-1, 1]? use (x + 1) / 2)" if lo < 0 else "")
                             + (" (images in [0, 255]? divide by 255)" if hi > 1.5 else ""))
    single = x.ndim == 3  # NumPy stays NumPy: batched callers move one batch at a time to the device
    return (x[None] if single else x), single


def as_image_pair(x, y, *, check_range: bool = True) -> tuple[jax.Array, jax.Array, bool]:
    if tuple(getattr(x, "shape", np.shape(x))) != tuple(getattr(y, "shape", np.shape(y))):
        raise ValueError(f"image shapes differ: {tuple(np.shape(x))} vs {tuple(np.shape(y))}")
    x, single = as_images(x, "first images", check_range=check_range)
    y, _ = as_images(y, "second images", check_range=check_range)
    if x.dtype != y.dtype:
        dt = jnp.promote_types(x.dtype, y.dtype)
        x, y = x.astype(dt), y.astype(dt)
    return x, y, single


def _result(v: jax.Array, single: bool) -> jax.Array:
    return v[0] if single else v


# ----------------------------------------------------------------------------------------------
# SSIM.

def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """scipy.ndimage mode 'reflect' (half-sample symmetric: d c b a | a b c d | d c b a)."""
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i < n, i, period - 1 - i)


def filter_taps(win_size: int, gaussian_weights: bool, sigma: float) -> np.ndarray:
    """The 1-D filter skimage applies along each axis (float64): a box of `win_size` taps, or scipy's
    normalised Gaussian of radius int(3.5 * sigma + 0.5)."""
    if not gaussian_weights:
        return np.full(win_size, 1.0 / win_size)
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x * x)
    return phi / phi.sum()


@functools.lru_cache(maxsize=32)
def filter_matrix(n: int, win_size: int, gaussian_weights: bool, sigma: float) -> np.ndarray:
    """(n - 2 * crop, n) float32: the filter along one axis, evaluated only at the positions that survive
    skimage's crop of crop = (win_size - 1) // 2 pixels, out-of-range taps reflected as scipy does."""
    taps = filter_taps(win_size, gaussian_weights, sigma)
    r, crop = len(taps) // 2, (win_size - 1) // 2
    rows = np.arange(crop, n - crop)
    m = np.zeros((len(rows), n), np.float64)
    for k, w in enumerate(taps):
        np.add.at(m, (np.arange(len(rows)), _reflect(rows + k - r, n)), w)
    return m.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("cov_norm", "c1", "c2"))
def _ssim_core(x, y, mh, mw, *, cov_norm: float, c1: float, c2: float) -> jax.Array:
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    maps = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)                        # (B, H, W, 5C)
    f = jnp.einsum("ih,bhwc,jw->bijc", mh, maps, mw, precision=HIGHEST)                 # (B, H', W', 5C)
    ux, uy, uxx, uyy, uxy = jnp.split(f, 5, axis=-1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2)).mean(axis=-1)                                             # (B,)


def ssim(x, y, *, data_range: float = 1.0, win_size: int | None = SSIM_WIN_SIZE, gaussian_weights: bool = False,
         sigma: float = 1.5, use_sample_covariance: bool = True, K1: float = 0.01, K2: float = 0.03,
         check_range: bool = True) -> jax.Array:
    """Mean SSIM per image, as `skimage.metrics.structural_similarity(x[i], y[i], channel_axis=-1, ...)`.

    Defaults: the pose-transfer protocol (win_size=51, data_range=1, uniform window, sample covariance).
    PATN/PIDM-style variant: `gaussian_weights=True, sigma=1.5, use_sample_covariance=False, win_size=None`.
    `win_size=None` follows skimage: 7 for the uniform window, 2 * int(3.5 * sigma + 0.5) + 1 for the
    Gaussian one. `check_range=False` accepts data outside [0, 1] (set `data_range` accordingly).
    """
    x, y, single = as_image_pair(x, y, check_range=check_range)
    if win_size is None:
        win_size = 2 * int(GAUSSIAN_TRUNCATE * sigma + 0.5) + 1 if gaussian_weights else 7
    if win_size % 2 != 1 or win_size < 1:
        raise ValueError(f"SSIM win_size must be odd and positive, got {win_size}")
    if sigma <= 0 or K1 < 0 or K2 < 0 or data_range <= 0:
        raise ValueError(f"SSIM needs sigma > 0, K1 >= 0, K2 >= 0, data_range > 0; got sigma={sigma}, "
                         f"K1={K1}, K2={K2}, data_range={data_range}")
    h, w = x.shape[1:3]
    if h < win_size or w < win_size:
        raise ValueError(f"images of {h}x{w} pixels are smaller than the {win_size}-pixel SSIM window")
    mh = filter_matrix(h, win_size, bool(gaussian_weights), float(sigma))
    mw = filter_matrix(w, win_size, bool(gaussian_weights), float(sigma))
    np_ = win_size ** 2
    cov_norm = np_ / (np_ - 1) if use_sample_covariance and np_ > 1 else 1.0
    out = _ssim_core(x, y, mh, mw, cov_norm=float(cov_norm), c1=float((K1 * data_range) ** 2),
                     c2=float((K2 * data_range) ** 2))
    return _result(out, single)


# ----------------------------------------------------------------------------------------------
# PSNR and L1.

@jax.jit
def _mse(x, y) -> jax.Array:
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    return jnp.mean(d * d, axis=(1, 2, 3))


def mse(x, y, *, check_range: bool = True) -> jax.Array:
    """Mean squared error per image."""
    x, y, single = as_image_pair(x, y, check_range=check_range)
    return _result(_mse(x, y), single)


def psnr(x, y, *, data_range: float = 1.0, check_range: bool = True) -> jax.Array:
    """PSNR in dB per image: 10 log10(data_range^2 / MSE), as `skimage.metrics.peak_signal_noise_ratio`
    (over all pixels and channels of each image; +inf for identical images)."""
    x, y, single = as_image_pair(x, y, check_range=check_range)
    return _result(10.0 * jnp.log10(data_range ** 2 / _mse(x, y)), single)


@jax.jit
def _l1(x, y) -> jax.Array:
    return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))


def l1(x, y, *, check_range: bool = True) -> jax.Array:
    """Mean absolute difference per image (over pixels and channels, images in [0, 1])."""
    x, y, single = as_image_pair(x, y, check_range=check_range)
    return _result(_l1(x, y), single)
