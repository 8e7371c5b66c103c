"""Discovery and checks for the golden parity cases produced by the original PyTorch IMAGPose.

Cases live in `../shared/golden` beside the repository, or in the folder named by `IMAGPOSE_GOLDEN_DIR`
(which then replaces it). A case is any sub-folder holding a `case.json`; see that folder's README.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO.parent / "shared" / "golden"


def golden_dir() -> Path:
    return Path(os.environ.get("IMAGPOSE_GOLDEN_DIR") or DEFAULT_DIR)


def case_dirs() -> list[Path]:
    root = golden_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "case.json").is_file())


def load_case(folder: Path) -> dict:
    with open(folder / "case.json") as f:
        return json.load(f)


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))


def check_tolerance(case: dict, ours: np.ndarray, expected: np.ndarray, what: str,
                    tolerance: dict | None = None) -> str:
    """Asserts the case's tolerance (or `tolerance`, the same keys and `abs_mean`: mean |ours - expected|); returns
    a one-line report of the measured error."""
    ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    assert ours.shape == expected.shape, f"{what}: shape {ours.shape} != expected {expected.shape}"
    assert np.isfinite(ours).all(), f"{what}: non-finite values"
    tol = case["tolerance"] if tolerance is None else tolerance
    diff = np.abs(ours - expected)
    measured = {"rel_max": diff.max() / np.abs(expected).max(), "abs_max": diff.max(), "abs_mean": diff.mean()}
    checked = [k for k in measured if k in tol]
    if not checked:
        raise AssertionError(f"{what}: tolerance {tol} names none of {sorted(measured)}")
    report = f"{what}: " + ", ".join(f"{k} {measured[k]:.3g} (tolerance {tol[k]})" for k in checked)
    for k in checked:
        assert measured[k] <= tol[k], f"{what}: {k} error {measured[k]:.3g} > tolerance {tol[k]} ({report})"
    return report
