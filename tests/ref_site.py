"""Reference packages that cannot live beside the project's own (torchvision's CUDA wheel breaks the CPU torch;
rtmlib needs OpenCV): pinned versions installed once (`pip install --no-deps --target`) into a private folder under
~/.cache/imagpose-jax, and used from a subprocess. An environment variable names a ready folder instead, or "off"
(those tests then skip, saying why)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imagpose-jax"


def private_site(env_var: str, name: str, specs: list[str], markers: tuple[str, ...]) -> Path:
    """The folder holding `specs` (installed on first use into cache_root()/name); `markers` are top-level package
    folders that show an install is complete."""
    env = os.environ.get(env_var)
    if env == "off":
        pytest.skip(f"{env_var}=off: no {' '.join(specs)} reference")
    if env:
        if not all((Path(env) / m).is_dir() for m in markers):
            pytest.skip(f"{env_var}={env} holds no {' / '.join(markers)} install")
        return Path(env)
    site = cache_root() / name
    if all((site / m).is_dir() for m in markers):
        return site
    tmp = site.parent / f".{site.name}.{os.getpid()}"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                           "--target", str(tmp), *specs], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"could not install the reference ({' '.join(specs)}) into a private folder: "
                    f"{proc.stderr.strip()[-500:]}")
    try:
        os.replace(tmp, site)
    except OSError:        # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return site
