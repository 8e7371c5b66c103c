"""No NaN or inf is written or loaded as a parameter (issue 15): the error names the first such tensor.

Arrays the host can read in place (numpy, jax arrays on CPU devices) are checked on the host; others where they
live, in one jitted reduction per call (a sharded train state is never gathered or copied to the host for it).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteParamsError(ValueError):
    """A floating-point tensor holds NaN or inf where finite parameters are needed; the message names it."""


@jax.jit
def _all_finite(values: list[jax.Array]) -> list[jax.Array]:
    return [jnp.isfinite(v).all() for v in values]


def _on_host(v) -> bool:
    return isinstance(v, np.ndarray) or (v.is_fully_addressable and all(d.platform == "cpu" for d in v.devices()))


def nonfinite(named: Mapping[str, Any]) -> list[str]:
    """The names (in order) of the floating-point arrays of `named` holding a NaN or an inf."""
    floats = {k: v for k, v in named.items() if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.inexact)}
    ok = {k: bool(np.isfinite(np.asarray(v)).all()) for k, v in floats.items() if _on_host(v)}
    device = [k for k in floats if k not in ok]
    if device:
        ok.update(zip(device, (bool(f) for f in jax.device_get(_all_finite([floats[k] for k in device])))))
    return [k for k in floats if not ok[k]]


def check_finite(named: Mapping[str, Any], what: str) -> None:
    """Raises `NonFiniteParamsError` "`what`: tensor '<first>' (and N more) holds NaN or inf" if any does."""
    bad = nonfinite(named)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NonFiniteParamsError(f"{what}: tensor {bad[0]!r}{more} holds NaN or inf")
