"""The inference folder's layout (`PipelineFolder`) and whole-folder atomic writes (`atomic_folder`).

An inference folder (what `imagpose-convert pipeline` and a training run's `export/` write, what
`IMAGPosePipeline.from_pretrained` reads) holds one parameter folder (`params.py`) per model:
  denoiser/        the IMAGPose denoiser
  denoiser_ema/    its EMA weights (training exports with EMA only)
  vae/             the VAE
  image_encoder/   DINOv2

Folders are written whole: `atomic_folder` writes into `<out>.tmp-<pid>` beside the target and swaps it in when
complete, so an interrupted write leaves the old folder (or none), never a mix of old and new parts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import shutil
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class PipelineFolder:
    root: str

    def __post_init__(self):
        object.__setattr__(self, "root", os.fspath(self.root))

    denoiser = property(lambda self: os.path.join(self.root, "denoiser"), doc="the IMAGPose denoiser's folder")
    denoiser_ema = property(lambda self: os.path.join(self.root, "denoiser_ema"), doc="its EMA weights' folder")
    vae = property(lambda self: os.path.join(self.root, "vae"), doc="the VAE's folder")
    image_encoder = property(lambda self: os.path.join(self.root, "image_encoder"), doc="DINOv2's folder")

    def check(self) -> PipelineFolder:
        """Raises FileNotFoundError naming the first missing part (denoiser/, vae/, image_encoder/)."""
        from imagpose_jax.checkpoint.params import CONFIG_FILE
        for part in (self.denoiser, self.vae, self.image_encoder):
            if not os.path.isfile(os.path.join(part, CONFIG_FILE)):
                raise FileNotFoundError(
                    f"missing weights: {part} (an inference folder has denoiser/, vae/ and image_encoder/, each "
                    f"config.json + params.safetensors; make one with `imagpose-convert pipeline`, or train: "
                    f"`imagpose train` writes <workdir>/export/)")
        return self


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.listdir(path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary folder beside `path` (`<path>.tmp-<pid>`) to write into; on a clean exit it replaces
    `path` whole, on an exception it is removed and `path` is untouched.

    An existing non-empty `path` is refused unless `overwrite`. The swap renames the old folder aside
    (`<path>.old-<pid>`), the new one in, then deletes the old: a kill in between leaves no folder at `path` (the
    complete new one waits at `<path>.tmp-<pid>`), never a mix.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not _is_empty_dir(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"{path} exists and is not a folder")
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty: pass --overwrite to replace it (the whole "
                                  f"folder is replaced)")
    leftovers = glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(glob.escape(path) + ".old-*")
    if leftovers:
        logging.warning("leftovers of an interrupted write of %s (safe to delete): %s", path, ", ".join(leftovers))
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _is_empty_dir(path):
        os.rmdir(path)
    if os.path.lexists(path):
        old = f"{path}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
