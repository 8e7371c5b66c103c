"""MediaPipe's pose landmarker as an `imagpose pose` backend, run in an isolated Python environment.

The model: MediaPipe's legacy ``mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1)``, whose model
files ship inside the ``mediapipe`` wheel up to 0.10.21 (newer wheels do not bundle them; complexities 0 and 2
download theirs at run time), so nothing is downloaded at run time. That wheel pins ``protobuf<5`` (grain needs
>= 5.28) and has no Python 3.13 build, so it cannot live in this package's environment: it runs in a virtual
environment of its own (``create_venv``, or by hand: ``python3.11 -m venv DIR && DIR/bin/pip install
mediapipe==0.10.21``), found at ``--mediapipe-venv DIR``, else ``$IMAGPOSE_MEDIAPIPE_VENV``, else
``~/.cache/imagpose-jax/mediapipe-0.10.21``. `MediaPipePose` starts that environment's python once, on a small
worker script (``WORKER``), and talks to it over pipes: each photo goes in as raw RGB bytes after a JSON header
line, its 33 landmarks come back as one JSON line on stdout.

The 33 landmarks (normalised x, y; visibility) become the 18 OpenPose keypoints (``landmarks_to_openpose``): the
nose, eyes (MediaPipe's 2 and 5, the eye centres), ears, shoulders, elbows, wrists, hips, knees and ankles map one
to one (MediaPipe's left is the person's left, as COCO's); the neck is the shoulders' midpoint, present when both
shoulders are, scored the lower of their visibilities. A landmark is missing (-1, -1, 0) when its visibility is
below the threshold (0.5, MediaPipe's own drawing threshold) or it lies outside the photo (MediaPipe also places
landmarks it infers beyond the frame).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from imagpose_jax.data.pose import NUM_KEYPOINTS

MEDIAPIPE_VERSION = "0.10.21"
VENV_ENV = "IMAGPOSE_MEDIAPIPE_VENV"
VISIBILITY_THR = 0.5
NUM_LANDMARKS = 33
# OpenPose body point i is MediaPipe landmark MEDIAPIPE_FOR_OPENPOSE[i]; None: the neck, the shoulders' (11, 12)
# midpoint.
MEDIAPIPE_FOR_OPENPOSE = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
# `create_venv`'s install: mediapipe without its declared dependencies (jax, jaxlib, sounddevice, sentencepiece and
# the GUI OpenCV, which legacy pose does not use), then what its `solutions` import needs. 23 s and 400 MB here
# against 84 s and 990 MB for `pip install mediapipe==0.10.21`.
VENV_PACKAGES = ("numpy<2", "protobuf>=4.25.3,<5", "absl-py", "attrs>=19.1.0", "flatbuffers>=2.0",
                 "opencv-contrib-python-headless<4.12", "matplotlib")

WORKER = r'''
import json, os, sys
out = os.fdopen(os.dup(1), "w")       # the protocol's stdout; anything else printed goes to stderr
os.dup2(2, 1)
import numpy as np
import mediapipe as mp
pose = mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1, enable_segmentation=False)
out.write(json.dumps({"ready": mp.__version__}) + "\n"); out.flush()
inp = sys.stdin.buffer
for line in iter(inp.readline, b""):
    h, w = json.loads(line)["shape"]
    rgb = np.frombuffer(inp.read(h * w * 3), np.uint8).reshape(h, w, 3)
    res = pose.process(rgb)
    lm = None if res.pose_landmarks is None else [[p.x, p.y, p.z, p.visibility] for p in res.pose_landmarks.landmark]
    out.write(json.dumps({"landmarks": lm}) + "\n"); out.flush()
'''


def default_venv() -> str:
    """``$IMAGPOSE_MEDIAPIPE_VENV``, else ``~/.cache/imagpose-jax/mediapipe-0.10.21`` (``$XDG_CACHE_HOME`` honoured)."""
    if os.environ.get(VENV_ENV):
        return os.environ[VENV_ENV]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "imagpose-jax", f"mediapipe-{MEDIAPIPE_VERSION}")


def venv_python(venv: str | os.PathLike) -> str:
    venv = os.fspath(venv)
    return os.path.join(venv, "Scripts", "python.exe") if os.name == "nt" else os.path.join(venv, "bin", "python")


def create_venv(venv: str | os.PathLike | None = None, *, python: str = sys.executable, timeout: float = 900) -> str:
    """Creates the MediaPipe environment at ``venv`` (default `default_venv()`) with ``python`` (3.9-3.12: the
    wheels' versions) and returns its path. Built beside it and renamed into place, so an interrupted install
    leaves none; an existing one is kept. Needs the network (or a pip index holding the wheels)."""
    venv = os.path.abspath(os.fspath(venv or default_venv()))
    if os.path.isfile(venv_python(venv)):
        return venv
    tmp = f"{venv}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--python", venv_python(tmp), "install", "--quiet",
           "--disable-pip-version-check"]
    steps = ([python, "-m", "venv", "--without-pip", tmp], pip + ["--no-deps", f"mediapipe=={MEDIAPIPE_VERSION}"],
             pip + list(VENV_PACKAGES))
    try:
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"creating the MediaPipe environment {venv} failed at `{' '.join(cmd[:6])} ...`: "
                                   f"{(proc.stderr or proc.stdout).strip()[-800:]}")
        os.replace(tmp, venv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return venv


def landmarks_to_openpose(landmarks, width: int, height: int, threshold: float = VISIBILITY_THR) -> np.ndarray:
    """(33, 4) MediaPipe landmarks (normalised x, y, z, visibility) of a width x height photo -> (18, 3) float32
    ``(x, y, score)`` OpenPose keypoints in its pixels; missing (-1, -1, 0) below the visibility threshold or off
    the photo (module docstring)."""
    lm = np.asarray(landmarks, np.float64)
    if lm.shape != (NUM_LANDMARKS, 4):
        raise ValueError(f"MediaPipe landmarks must be (33, 4) (x, y, z, visibility), got {lm.shape}")
    xy = lm[:, :2] * (width, height)
    present = (lm[:, 3] >= threshold) & (xy >= 0).all(-1) & (xy[:, 0] < width) & (xy[:, 1] < height)
    out = np.tile(np.float32([-1, -1, 0]), (NUM_KEYPOINTS, 1))
    for i, j in enumerate(MEDIAPIPE_FOR_OPENPOSE):
        if j is None:
            if present[11] and present[12]:
                out[i] = (*((xy[11] + xy[12]) / 2), min(lm[11, 3], lm[12, 3]))
        elif present[j]:
            out[i] = (*xy[j], lm[j, 3])
    return out


class MediaPipePose:
    """The MediaPipe backend: ``MediaPipePose(venv)(rgb)`` -> (18, 3) float32 ``(x, y, score)`` OpenPose keypoints
    in photo pixels (missing points (-1, -1, 0)), or None when no person is found. One worker process serves all
    calls (started on the first; ``close()`` or a ``with`` block ends it)."""

    def __init__(self, venv: str | os.PathLike | None = None, *, visibility_threshold: float = VISIBILITY_THR):
        self.venv = os.fspath(venv or default_venv())
        self.python = venv_python(self.venv)
        if not os.path.isfile(self.python):
            raise FileNotFoundError(
                f"no MediaPipe environment at {self.venv} ({self.python} not found): create it with "
                f"`imagpose pose --create-mediapipe-venv --mediapipe-venv {self.venv}`, or `python3.11 -m venv "
                f"{self.venv} && {self.venv}/bin/pip install mediapipe=={MEDIAPIPE_VERSION}`; or name one with "
                f"--mediapipe-venv / {VENV_ENV}")
        self.visibility_threshold = visibility_threshold
        self._proc = None
        self._stderr = None

    def _start(self):
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([self.python, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr)
        ready = self._reply()
        if ready.get("ready") != MEDIAPIPE_VERSION:
            self.close()
            raise RuntimeError(f"{self.venv} holds mediapipe {ready.get('ready')}, not {MEDIAPIPE_VERSION} (the last "
                               f"wheel that bundles the legacy pose models)")

    def _reply(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
            self.close()
            last = lines[-1].strip() if lines else "no message"
            raise RuntimeError(f"the MediaPipe worker ({self.python}) stopped: {last} (a mediapipe=="
                               f"{MEDIAPIPE_VERSION} environment? `imagpose pose --create-mediapipe-venv --mediapipe-venv "
                               f"DIR` makes one)")
        return json.loads(line)

    def landmarks(self, rgb: np.ndarray) -> np.ndarray | None:
        """The photo's 33 landmarks (33, 4) (normalised x, y, z, visibility), or None."""
        rgb = np.ascontiguousarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {rgb.dtype} {rgb.shape}")
        if self._proc is None:
            self._start()
        self._proc.stdin.write(json.dumps({"shape": rgb.shape[:2]}).encode() + b"\n" + rgb.tobytes())
        self._proc.stdin.flush()
        lm = self._reply()["landmarks"]
        return None if lm is None else np.asarray(lm, np.float64)

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        lm = self.landmarks(rgb)
        if lm is None:
            return None
        return landmarks_to_openpose(lm, rgb.shape[1], rgb.shape[0], self.visibility_threshold)

    def close(self) -> None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> MediaPipePose:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass
