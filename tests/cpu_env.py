"""The environment of a test's subprocess: this process's (the conftest's XLA flags, compilation cache and matmul
precision), JAX on the CPU with `devices` host devices, and tests/ importable."""
from __future__ import annotations

import os


def cpu_env(devices: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip(),
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")]),
               **extra)
    return env
