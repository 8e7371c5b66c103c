"""LPIPS v0.1 (the `lpips` package's `LPIPS(net='vgg' | 'alex')`) in Flax NNX, with a strict loader.

`LPIPS(x, y)` takes (B, H, W, 3) images in [0, 1] (the package's `forward(..., normalize=True)`) and returns
(B,): inputs scaled to [-1, 1], shifted/scaled by the package's `ScalingLayer`, five backbone activations
(VGG16 relu1_2 .. relu5_3, or AlexNet relu1 .. relu5) unit-normalised over channels (eps 1e-10 added to
the norm), squared differences weighted by the 1x1 linear layers `lin0..lin4`, averaged over space and summed.

Weights come from two files the user supplies, both in their PyTorch formats:
- the torchvision backbone state dict (`vgg16-397923af.pth` or `alexnet-owt-7be5be79.pth`): `features.*` is
  loaded, the ImageNet classifier `classifier.*` is deliberately skipped;
- the LPIPS linear layers (`lpips/weights/v0.1/vgg.pth` or `alex.pth`, shipped in the `lpips` package):
  `lin{k}.model.1.weight`, (1, C, 1, 1). `lins.{k}.*` (the package registers each layer twice, so a
  `LPIPS().state_dict()` has both) is skipped after checking it equals `lin{k}`.
Parameter paths mirror the PyTorch keys: `net.features.{i}.kernel` <-> `features.{i}.weight` (same indices
as torchvision's `nn.Sequential`), `lin{k}.model.1.kernel` <-> `lin{k}.model.1.weight`.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagpose_jax.metrics.image import as_image_pair

HIGHEST = jax.lax.Precision.HIGHEST

# lpips.ScalingLayer: (x - shift) / scale, per RGB channel.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
EPS = 1e-10


class ReLU(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class MaxPool(nnx.Module):
    """`nn.MaxPool2d(kernel, stride)`, no padding, floor mode."""

    def __init__(self, kernel: int, stride: int):
        self.kernel, self.stride = kernel, stride

    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel, self.stride
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), "VALID")


class Identity(nnx.Module):
    """Stands where PyTorch has a layer without parameters that is a no-op at inference (`nn.Dropout`)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def _conv(cin: int, cout: int, k: int, *, stride: int = 1, padding: int = 0, bias: bool = True,
          rngs, precision=HIGHEST) -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((padding, padding), (padding, padding)),
                    use_bias=bias, precision=precision, rngs=rngs)


# VGG16 ('D'): 3x3 convs (padding 1) + ReLU, 2x2 max pools; LPIPS taps relu1_2 .. relu5_3.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
NETS = {
    # name: (channels of the five taps, index in `features` after which each tap is read, min image side)
    "vgg": ((64, 128, 256, 512, 512), (3, 8, 15, 22, 29), 16),
    "alex": ((64, 192, 384, 256, 256), (1, 4, 7, 9, 11), 31),
}


class Backbone(nnx.Module):
    """torchvision's `vgg16().features` or `alexnet().features`, same layer indices, NHWC."""

    def __init__(self, net: str, *, rngs, precision=HIGHEST):
        layers: list[nnx.Module] = []
        if net == "vgg":
            cin = 3
            for v in VGG16_CFG:
                if v == "M":
                    layers.append(MaxPool(2, 2))
                else:
                    layers += [_conv(cin, v, 3, padding=1, rngs=rngs, precision=precision), ReLU()]
                    cin = v
        elif net == "alex":
            c = lambda i, o, k, **kw: _conv(i, o, k, rngs=rngs, precision=precision, **kw)  # noqa: E731
            layers = [c(3, 64, 11, stride=4, padding=2), ReLU(), MaxPool(3, 2),
                      c(64, 192, 5, padding=2), ReLU(), MaxPool(3, 2),
                      c(192, 384, 3, padding=1), ReLU(),
                      c(384, 256, 3, padding=1), ReLU(),
                      c(256, 256, 3, padding=1), ReLU(), MaxPool(3, 2)]
        else:
            raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
        self.features = nnx.List(layers)
        self.taps = NETS[net][1]

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outs = []
        for i in range(self.taps[-1] + 1):
            x = self.features[i](x)
            if i in self.taps:
                outs.append(x)
        return outs


class NetLinLayer(nnx.Module):
    """lpips' `NetLinLayer`: `model = Sequential(Dropout, Conv2d(C, 1, 1, bias=False))`."""

    def __init__(self, cin: int, *, rngs, precision=HIGHEST):
        self.model = nnx.List([Identity(), _conv(cin, 1, 1, bias=False, rngs=rngs, precision=precision)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.model[1](self.model[0](x))


class LPIPS(nnx.Module):
    """`LPIPS(net)(x, y)` -> (B,) perceptual distances; x, y (B, H, W, 3) in [0, 1] (also (H, W, 3) -> scalar).

    Construct with `load_lpips` (weights from files); a bare `LPIPS(net, rngs=...)` has random weights.
    """

    def __init__(self, net: str = "vgg", *, rngs, precision=HIGHEST):
        if net not in NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
        self.net_name = net
        self.net = Backbone(net, rngs=rngs, precision=precision)
        for k, c in enumerate(NETS[net][0]):
            setattr(self, f"lin{k}", NetLinLayer(c, rngs=rngs, precision=precision))

    @property
    def min_size(self) -> int:
        return NETS[self.net_name][2]

    def __call__(self, x, y, *, check_range: bool = True) -> jax.Array:
        x, y, single = as_image_pair(x, y, check_range=check_range)
        if x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects RGB images (3 channels), got {x.shape[-1]}")
        if min(x.shape[1:3]) < self.min_size:
            raise ValueError(f"LPIPS-{self.net_name} needs images of at least {self.min_size}x{self.min_size} "
                             f"pixels, got {x.shape[1]}x{x.shape[2]}")
        b = x.shape[0]
        z = jnp.concatenate([x, y]).astype(jnp.float32)
        z = ((2 * z - 1) - SHIFT) / SCALE
        total = jnp.zeros((b,), jnp.float32)
        for k, f in enumerate(self.net(z)):
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)
            d = (f[:b] - f[b:]) ** 2
            total = total + getattr(self, f"lin{k}")(d).mean(axis=(1, 2, 3))
        return total[0] if single else total


def lpips_distance(model: LPIPS, x, y, *, batch_size: int = 16) -> np.ndarray:
    """(N,) LPIPS distances of N image pairs ((N, H, W, 3) in [0, 1]), jitted and batched."""
    from imagpose_jax.metrics.batching import apply_batched
    x, y, single = as_image_pair(x, y)
    d = apply_batched(model, (x, y), batch_size)
    return d[0] if single else d


# ----------------------------------------------------------------------------------------------
# Loading the user's files.

def _sub_state(state: nnx.State, first: tuple[str, ...]) -> nnx.State:
    return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(state) if str(p[0]) in first])


def load_lpips(backbone: str | os.PathLike, linear: str | os.PathLike, net: str = "vgg", *,
               precision=HIGHEST) -> LPIPS:
    """LPIPS from the torchvision backbone file and the lpips v0.1 linear-layer file (PyTorch formats).

    Strict: every parameter is filled, every key of both files is loaded or deliberately skipped (listed in
    the module docstring), shapes are checked; otherwise ConversionError names the keys and the file.
    """
    from convert_weights.core import Skip, load_torch_file, torch_to_nnx
    from imagpose_jax.models.init import abstract

    model = abstract(lambda k: LPIPS(net, rngs=k, precision=precision))
    params = nnx.state(model, nnx.Param)
    n_lin = len(NETS[net][0])
    lin_names = tuple(f"lin{k}" for k in range(n_lin))

    path = os.fspath(backbone)
    backbone_sd = load_torch_file(path)
    net_state = torch_to_nnx(nnx.state(model.net, nnx.Param), backbone_sd, source=path, skip=[
        Skip(r"^classifier\.", "torchvision's ImageNet classifier head: LPIPS reads only `features`")])

    path = os.fspath(linear)
    linear_sd = load_torch_file(path)

    def same_as_lin(key: str, value: np.ndarray) -> None:
        k = key.split(".")[1]
        twin = linear_sd.get(f"lin{k}.model.1.weight")
        if twin is None:  # reported as a missing key
            return
        if twin.shape != value.shape or not np.array_equal(twin, value):
            from convert_weights.core import ConversionError
            raise ConversionError(f"{path}: {key} differs from lin{k}.model.1.weight (they are one layer in lpips)")

    lin_state = torch_to_nnx(_sub_state(params, lin_names), linear_sd, source=path, skip=[
        Skip(r"^lins\.\d+\.model\.1\.weight$", "lpips registers each linear layer twice (lin{k} and lins.{k})",
             check=same_as_lin)])
    nnx.update(model.net, net_state)
    nnx.update(model, lin_state)
    return model
