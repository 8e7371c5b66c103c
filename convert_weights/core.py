"""Generic PyTorch <-> Flax NNX weight mapping, checked strictly against the model's abstract state.

Every model here names its parameters after the PyTorch original, so one rule turns a path of our
state into the PyTorch key: join the path with dots, apply the model's small rename table, and map
the leaf name (`kernel`/`scale`/`embedding` -> `weight`). Layouts differ only for kernels:
conv (O, I, kh, kw) <-> (kh, kw, I, O) and linear (O, I) <-> (I, O).

`torch_to_nnx` walks the *expected* tree (from `nnx.eval_shape`), so a missing key, an unexpected key
or a shape mismatch is an error naming the key. Keys that a model deliberately does not load are
listed by the caller as `skip` patterns with a reason; there is no other way to ignore a key.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flax import nnx

from imagpose_jax.errors import first_line


class ConversionError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


# ----------------------------------------------------------------------------------------------
# Reading the on-disk formats.

def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict from .safetensors, .bin, .pth, .pt or .ckpt into float numpy arrays.

    Accepts the wrappers that real files carry: a top-level `state_dict` (Lightning/AnimateDiff) and a
    `module.` prefix on every key (DataParallel / DeepSpeed).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".safetensors":
            from safetensors.numpy import load_file
            try:
                sd = dict(load_file(path))
            except (TypeError, ValueError):  # bf16 tensors have no numpy dtype: go through torch
                from safetensors.torch import load_file as load_torch
                sd = dict(load_torch(path))
        elif ext in (".bin", ".pth", ".pt", ".ckpt"):
            sd = _torch_load(path)
        else:
            raise ConversionError(
                f"{path}: unknown checkpoint format {ext!r} (expected .safetensors, .bin, .pth, .pt or .ckpt)")
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ConversionError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    return unwrap_state_dict(sd, source=path)


def _torch_load(path: str):
    """`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary pickled objects. A file
    that is not a whole `torch.save` file (a zip archive with a data.pkl, or a legacy pickle), or that holds other
    objects, is a one-line ConversionError naming it (not torch's advice to load it with weights_only=False)."""
    import pickle
    import zipfile

    import torch
    with open(path, "rb") as f:
        head = f.read(4)
    what = None
    if head.startswith(b"PK\x03\x04"):  # torch >= 1.6: a zip archive holding <name>/data.pkl
        if not zipfile.is_zipfile(path):
            what = f"a truncated or damaged zip archive ({os.path.getsize(path)} bytes)"
        elif not any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist()):
            what = "not a PyTorch checkpoint (a zip archive without torch.save's data.pkl)"
    elif not head.startswith(b"\x80"):  # a pickle (torch.save's legacy format) starts with its PROTO opcode
        what = f"not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; it starts with {head!r})"
    if what:
        raise ConversionError(f"cannot read checkpoint {path}: {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).partition("WeightsUnpickler error:")[2].strip().split(". ")[0].splitlines()[:1]
        raise ConversionError(f"cannot read checkpoint {path}: not a plain state dict of tensors "
                              f"({detail[0] if detail else first_line(e)}); "
                              f"only weights are read (torch.load weights_only=True): save its state dict alone, "
                              f"torch.save(model.state_dict(), ...)") from None
    except (RuntimeError, EOFError) as e:
        reason = first_line(e) if str(e).strip() else f"{type(e).__name__}: the file ends early"
        raise ConversionError(f"cannot read checkpoint {path}: {reason} (truncated or damaged?)") from None


def unwrap_state_dict(sd, source: str = "<state dict>") -> dict[str, np.ndarray]:
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not hasattr(v, "shape"):
            raise ConversionError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if k.startswith("module."):
            k = k[len("module."):]
        out[k] = _to_numpy(v)
    return out


def _to_numpy(v) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    import torch  # only torch tensors get here
    if v.dtype == torch.bfloat16:
        v = v.float()
    return v.detach().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Names and layouts.

LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


@dataclass(frozen=True)
class Skip:
    """A PyTorch key pattern that is deliberately not loaded, with the reason (shown in reports).

    `check(key, array)` may verify that the skipped value is what the model computes itself (for
    example a fixed position-encoding table); it raises ConversionError when it is not.
    """
    pattern: str
    reason: str
    check: Callable[[str, np.ndarray], None] | None = None

    def matches(self, key: str) -> bool:
        return re.search(self.pattern, key) is not None


def torch_key(path: Iterable, renames: Iterable[tuple[str, str]] = ()) -> str:
    """Our state path -> the PyTorch state-dict key."""
    parts = [str(p) for p in path]
    parts[-1] = LEAF_TO_TORCH.get(parts[-1], parts[-1])
    name = "." + ".".join(parts) + "."
    for ours, theirs in renames:
        name = name.replace("." + ours + ".", "." + theirs + ".")
    return name[1:-1]


def from_torch_layout(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if a.ndim == 4:
            return a.transpose(2, 3, 1, 0)   # (O, I, kh, kw) -> (kh, kw, I, O)
        if a.ndim == 2:
            return a.T                        # (O, I) -> (I, O)
    return a


def to_torch_layout(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if a.ndim == 4:
            return a.transpose(3, 2, 0, 1)
        if a.ndim == 2:
            return a.T
    return a


def _leaf(v):
    return v if hasattr(v, "shape") else v.get_value()


def _leaf_shape(v) -> tuple:
    return tuple(_leaf(v).shape)


def torch_to_nnx(abstract: nnx.State, sd: Mapping[str, np.ndarray], *, renames=(), skip: Iterable[Skip] = (),
                 prefix: str = "", dtype=None, source: str = "checkpoint",
                 origins: Mapping[str, str] | None = None) -> nnx.State:
    """Fills the abstract state `abstract` from the PyTorch state dict `sd`, strictly.

    Each tensor is cast to `dtype` (default: its abstract leaf's, float32 unless the model was built in another).
    `prefix` is prepended to every PyTorch key (for state dicts that hold a submodule). `origins`: for a state
    dict renamed from a file's own layout, the file's key of each key of `sd`, named next to it in errors.
    Raises ConversionError naming every missing key, unexpected key and shape mismatch.
    """
    skip = tuple(skip)
    origins = origins or {}
    name = lambda k: f"{k} (file: {origins[k]})" if k in origins else k  # noqa: E731
    flat = nnx.to_flat_state(abstract)
    used, missing, wrong, values = set(), [], [], []
    for path, var in flat:
        key = prefix + torch_key(path, renames)
        want = _leaf_shape(var)
        if key not in sd:
            missing.append(f"{key} (expected shape {want})")
            values.append(None)
            continue
        used.add(key)
        a = from_torch_layout(str(path[-1]), np.asarray(sd[key]))
        if tuple(a.shape) != want:
            theirs = tuple(np.asarray(sd[key]).shape)
            wrong.append(f"{name(key)}: checkpoint has {theirs}, model expects {tuple(to_torch_layout(str(path[-1]), np.empty(want)).shape)}")
            values.append(None)
            continue
        values.append(a.astype(dtype or _leaf(var).dtype, copy=False))
    unexpected = []
    for k in sd:
        if k in used:
            continue
        rule = next((s for s in skip if s.matches(k)), None)
        if rule is None:
            unexpected.append(f"{name(k)} {tuple(np.asarray(sd[k]).shape)}")
        elif rule.check is not None:
            rule.check(k, np.asarray(sd[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + "; ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + "; ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): " + "; ".join(wrong[:20]) + (" ..." if len(wrong) > 20 else ""))
    if problems:
        raise ConversionError(f"{source} does not match the model:\n  " + "\n  ".join(problems))
    out = []
    for (path, var), a in zip(flat, values):
        out.append((path, var.replace(a) if hasattr(var, "replace") else a))
    return nnx.from_flat_state(out)


def nnx_to_torch(state: nnx.State, *, renames=(), prefix: str = "", dtype=np.float32) -> dict[str, np.ndarray]:
    """Our (concrete) state -> a flat PyTorch-layout dict of numpy arrays."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        a = np.asarray(var.get_value() if hasattr(var, "get_value") else var)
        out[prefix + torch_key(path, renames)] = np.ascontiguousarray(to_torch_layout(str(path[-1]), a)).astype(dtype)
    return out


def save_torch_file(sd: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes a state dict the way the original does (`torch.save` of CPU tensors), or safetensors by extension."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
        return
    from collections import OrderedDict

    import torch
    torch.save(OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v))) for k, v in sd.items()), path)
