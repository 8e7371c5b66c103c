"""OpenPose/ControlNet body-style pose renderings and keypoint file readers (spec section 10).

Keypoints are 18 COCO/OpenPose points as ``(x, y)`` in the order of ``KEYPOINT_NAMES``; a point
with a negative or non-finite coordinate is missing, and so is every limb that touches it.
The drawing follows the OpenPose body style the original's DWPose renderer uses: 17 limbs as
filled ellipses (half-width 4 px) in the 18-colour palette, the limb layer dimmed to 60 %, then
one radius-4 dot per keypoint at full colour, all on black.
"""
from __future__ import annotations

import ast
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

KEYPOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)

# (a, b) keypoint indices of the 17 limbs; limb i is drawn in COLORS[i].
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
# RGB; keypoint i is drawn in COLORS[i].
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
STICK_WIDTH = 4
DOT_RADIUS = 4
LIMB_OPACITY = 0.6


def missing_mask(keypoints: np.ndarray) -> np.ndarray:
    """(18, 2) -> (18,) bool: True where a keypoint is missing (negative or non-finite)."""
    kp = np.asarray(keypoints, dtype=np.float64)
    return ~np.all(np.isfinite(kp) & (kp >= 0), axis=-1)


def _ellipse_polygon(center: tuple[int, int], axes: tuple[int, int], angle: int) -> list[tuple[int, int]]:
    """Vertices of a 1-degree-step ellipse outline, as OpenCV's ``ellipse2Poly`` computes them."""
    angle %= 360
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    t = np.radians(np.arange(0, 361))
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    px = np.rint(center[0] + x * ca - y * sa).astype(int)  # rint rounds half to even, as cvRound
    py = np.rint(center[1] + x * sa + y * ca).astype(int)
    return list(zip(px.tolist(), py.tolist()))


def _disc_spans(radius: int) -> dict[int, int]:
    """Row offset -> half-width of OpenCV's filled midpoint circle of the given radius."""
    spans: dict[int, int] = {}
    err, dx, dy, plus, minus = 0, radius, 0, 1, 2 * radius - 1
    while dx >= dy:
        for row, half in ((dy, dx), (dx, dy)):
            for r in (-row, row):
                spans[r] = max(spans.get(r, 0), half)
        dy += 1
        err += plus
        plus += 2
        if err > 0:
            err -= minus
            dx -= 1
            minus -= 2
    return spans


_DOT_SPANS = _disc_spans(DOT_RADIUS)


def render_pose(keypoints, height: int, width: int, *, normalized: bool = False) -> np.ndarray:
    """Draw an 18-keypoint body pose on black.

    Args:
      keypoints: (18, 2) ``(x, y)``, in pixels or, with ``normalized=True``, as fractions of the
        width and height; missing points are -1 (any negative or non-finite value).
      height, width: canvas size in pixels.
    Returns:
      (height, width, 3) uint8 RGB.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape != (NUM_KEYPOINTS, 2):
        raise ValueError(f"keypoints must have shape (18, 2), got {kp.shape}")
    missing = missing_mask(kp)
    if normalized:
        kp = kp * np.array([width, height], dtype=np.float64)

    limbs = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(limbs)
    for i, (a, b) in enumerate(LIMBS):
        if missing[a] or missing[b]:
            continue
        (xa, ya), (xb, yb) = kp[a], kp[b]
        length = math.hypot(xa - xb, ya - yb)
        angle = int(math.degrees(math.atan2(ya - yb, xa - xb)))
        center = (int((xa + xb) / 2), int((ya + yb) / 2))
        draw.polygon(_ellipse_polygon(center, (int(length / 2), STICK_WIDTH), angle), fill=COLORS[i])
    canvas = (np.asarray(limbs, dtype=np.float64) * LIMB_OPACITY).astype(np.uint8)  # (H, W, 3)

    for i in np.flatnonzero(~missing):
        cx, cy = int(kp[i, 0]), int(kp[i, 1])
        for dy, half in _DOT_SPANS.items():
            y = cy + dy
            if 0 <= y < height:
                canvas[y, max(cx - half, 0):max(cx + half + 1, 0)] = COLORS[i]
    return canvas


def load_openpose_json(path: str | os.PathLike, *, min_confidence: float = 0.0) -> np.ndarray:
    """Read the first person's body keypoints from an OpenPose-format JSON file.

    The file holds ``{"people": [{"pose_keypoints_2d": [x0, y0, c0, ..., x17, y17, c17]}, ...]}``
    in pixels. A keypoint whose confidence is not above ``min_confidence`` is missing.
    Returns (18, 2) float32 ``(x, y)`` with -1 for missing points.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read OpenPose JSON {os.fspath(path)!r}: {err}") from err
    people = data.get("people") if isinstance(data, dict) else None
    if not people:
        raise ValueError(f"OpenPose JSON {os.fspath(path)!r} has no people")
    flat = people[0].get("pose_keypoints_2d") if isinstance(people[0], dict) else None
    if not isinstance(flat, list):
        raise ValueError(f"OpenPose JSON {os.fspath(path)!r}: people[0] has no pose_keypoints_2d list")
    expected = NUM_KEYPOINTS * 3
    if len(flat) != expected:
        raise ValueError(
            f"OpenPose JSON {os.fspath(path)!r}: pose_keypoints_2d has {len(flat)} values, expected "
            f"{expected} (18 keypoints x (x, y, confidence))")
    try:
        values = np.asarray(flat, dtype=np.float64).reshape(NUM_KEYPOINTS, 3)
    except (TypeError, ValueError) as err:
        raise ValueError(f"OpenPose JSON {os.fspath(path)!r}: pose_keypoints_2d is not numeric: {err}") from err
    kp = values[:, :2].astype(np.float32)
    kp[values[:, 2] <= min_confidence] = -1
    return kp


def openpose_canvas(path: str | os.PathLike) -> tuple[int, int] | None:
    """The (width, height) an OpenPose JSON's keypoints are in (`canvas_width`/`canvas_height`, as `imagpose pose`
    writes them), or None when the file does not say."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    w, h = (data.get("canvas_width"), data.get("canvas_height")) if isinstance(data, dict) else (None, None)
    if w is None or h is None:
        return None
    if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
        raise ValueError(f"OpenPose JSON {os.fspath(path)!r}: canvas {w}x{h} is not a positive size")
    return int(w), int(h)


NORMALIZED_SLACK = 0.1   # normalised keypoints may lie this far outside [0, 1] (a foot just out of frame)
MIN_VISIBLE = 3          # fewer keypoints than this on the canvas is not a pose


def keypoints_to_view(keypoints, height: int, width: int, *, frame: tuple[int, int] | None = None,
                      source: str = "keypoints") -> np.ndarray:
    """(18, 2) keypoints -> (18, 2) pixels of a height x width view, -1 where missing or off the view.

    The frame the keypoints are in, in this order:
      * normalised: every visible coordinate within [-0.1, 1.1] (`NORMALIZED_SLACK`) -> fractions of the view;
      * `frame` = (W, H): the pixels of the image they were taken from (the JSON's canvas, or the source photo),
        scaled to the view exactly as that image is resized to it (independently in x and y);
      * otherwise they must already be view pixels: a point beyond the view is then an error, not a silent crop.
    A point is missing when non-finite or below -0.5 in either coordinate (-1 marks missing). Fewer than
    `MIN_VISIBLE` points on the view is an error naming `source`."""
    kp = np.asarray(keypoints, np.float64)
    if kp.shape != (NUM_KEYPOINTS, 2):
        raise ValueError(f"{source}: keypoints must have shape (18, 2) (OpenPose body order), got {kp.shape}")
    visible = np.isfinite(kp).all(-1) & (kp > -0.5).all(-1)
    v = kp[visible]
    if v.size and v.min() >= -NORMALIZED_SLACK and v.max() <= 1 + NORMALIZED_SLACK:
        out = kp * (width, height)
    elif frame is not None:
        fw, fh = frame
        out = kp * (width / fw, height / fh)
    else:
        if v.size and (v[:, 0].max() >= width + 0.5 or v[:, 1].max() >= height + 0.5):
            raise ValueError(f"{source}: keypoints reach ({v[:, 0].max():.0f}, {v[:, 1].max():.0f}), beyond the "
                             f"{width}x{height} view, and their frame is unknown: give the JSON its canvas_width / "
                             f"canvas_height (as `imagpose pose` writes), or the photo they come from")
        out = kp.copy()
    on_view = visible & (out[:, 0] >= -0.5) & (out[:, 0] < width + 0.5) & (out[:, 1] >= -0.5) & (out[:, 1] < height + 0.5)
    if on_view.sum() < MIN_VISIBLE:
        raise ValueError(f"{source}: only {int(on_view.sum())} of 18 keypoints are visible on the {width}x{height} "
                         f"view (at least {MIN_VISIBLE} are needed for a pose)")
    return np.where(on_view[:, None], out, -1.0).astype(np.float32)


def _parse_int_list(text: str, what: str) -> list[int]:
    """Parse one DeepFashion list field such as ``"[25, 37, -1]"``."""
    try:
        values = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"{what} is not a list of integers: {text!r}") from err
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise ValueError(f"{what} is not a list of integers: {text!r}")
    if len(values) != NUM_KEYPOINTS:
        raise ValueError(f"{what} has {len(values)} values, expected {NUM_KEYPOINTS}")
    return values


def parse_deepfashion_keypoints(y_str: str, x_str: str) -> np.ndarray:
    """Parse the ``keypoints_y`` and ``keypoints_x`` fields of a DeepFashion annotation row.

    Each field is a list of 18 integers, -1 where missing. Returns (18, 2) float32 ``(x, y)``
    with both coordinates -1 where either is missing.
    """
    ys = _parse_int_list(y_str, "keypoints_y")
    xs = _parse_int_list(x_str, "keypoints_x")
    kp = np.stack([np.asarray(xs), np.asarray(ys)], axis=-1).astype(np.float32)
    kp[missing_mask(kp)] = -1
    return kp
