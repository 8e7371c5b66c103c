"""DWPose on ONNX Runtime: the person detector and whole-body pose model the original IMAGPose runs on photos.

The original (``dwpose/`` in IMAGPose, from IDEA-Research/DWPose's ``onnx`` branch) chains two ONNX files:

- ``yolox_l.onnx``, YOLOX-L on COCO: the photo, as BGR uint8, letterboxed into 640x640 (scaled by
  ``r = min(640 / H, 640 / W)`` with OpenCV's bilinear ``resize``, placed top-left on a 114-grey canvas), fed as
  float32 0..255 without normalisation. Its (1, 8400, 5 + classes) output holds, per anchor of the stride-8/16/32
  grids, the raw centre offsets and log sizes and the sigmoid objectness and class scores. Boxes are decoded
  (``(offset + cell) * stride``, ``exp(log size) * stride``), scored ``objectness * class``; person boxes
  scoring above 0.1 go through NMS (IoU 0.45, the ``+1`` pixel areas of the original) and those above 0.3 stay.
- ``dw-ll_ucoco_384.onnx``, RTMPose-l whole-body (133 COCO-WholeBody keypoints) with SimCC heads: each box is
  enlarged 1.25x, widened or heightened to the model's 288:384 aspect, cut out by OpenCV's bilinear
  ``warpAffine`` (black outside the photo), normalised with ImageNet's mean/std (applied to the BGR channels,
  as the original does) and fed as (1, 3, 384, 288) float32. The (1, 133, 576) and (1, 133, 768) SimCC outputs
  give each keypoint at ``argmax / 2`` in the crop, with the score ``min(max_x, max_y)``.

The 17 COCO body keypoints become the 18 OpenPose ones (``coco_to_openpose``): the neck is the shoulders'
midpoint, present (score 1) when both shoulders score above 0.3; of several persons the one with the highest mean
of the 18 scores is kept; a keypoint scoring at most 0.3 is missing.

OpenCV is not needed: its bilinear ``resize`` and ``warpAffine`` are reproduced in NumPy, fixed-point
arithmetic included (``resize_bilinear``, ``warp_affine``; equal to OpenCV 4.13's output in the tests). PIL's
``resize`` antialiases when it downscales and its ``transform`` puts pixel centres at half-integers, so it
would not match. One deliberate difference: with no person detected the original runs the pose model on the whole
photo (and so always draws someone); here that is ``full_image_fallback=True``, and by default such a photo
has no pose.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from imagpose_jax.data.pose import NUM_KEYPOINTS

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
DET_INPUT_SIZE = (640, 640)           # (H, W), when the detector's input shape is not fixed in its file
POSE_INPUT_SIZE = (384, 288)          # (H, W), likewise for the pose model
LETTERBOX_PAD = 114
STRIDES = (8, 16, 32)
DET_SCORE_THR = 0.1                   # person score to enter NMS
NMS_THR = 0.45
BOX_SCORE_THR = 0.3                   # person score to keep a box after NMS
BBOX_PADDING = 1.25
POSE_MEAN = np.array([123.675, 116.28, 103.53])
POSE_STD = np.array([58.395, 57.12, 57.375])
SIMCC_SPLIT_RATIO = 2.0
KEYPOINT_THR = 0.3                    # a keypoint scoring at most this is missing
NUM_WHOLEBODY = 133

# OpenPose body point i is COCO point COCO_FOR_OPENPOSE[i]; None: the neck, the shoulders' (5, 6) midpoint.
COCO_FOR_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)


# ---------------------------------------------------------------------------------------------------------
# OpenCV's bilinear resampling, in NumPy.

def resize_bilinear(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """``cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR)`` of a uint8 (H, W, C) image, bit for bit.

    Output pixel ``d`` samples input ``(d + 0.5) * in / out - 0.5`` (float32) from its two neighbours, without
    antialiasing when downscaling. OpenCV's fixed point: weights in 1/2048, the horizontal pass exact, the
    vertical one as its SIMD code rounds (each row's term truncated, then the sum rounded); columns beyond the
    edge take the edge pixel, rows beyond it blend the edge row with itself.
    """
    h, w = img.shape[:2]

    def taps(n_in: int, n_out: int):
        f = ((np.arange(n_out) + 0.5) * (1.0 / (n_out / n_in)) - 0.5).astype(np.float32)
        i0 = np.floor(f).astype(np.int64)
        return i0, (f - i0).astype(np.float32)

    x0, fx = taps(w, out_w)
    fx[(x0 < 0) | (x0 >= w - 1)] = 0
    x0 = np.clip(x0, 0, w - 1)
    ax0, ax1 = np.rint((1 - fx) * 2048).astype(np.int64), np.rint(fx * 2048).astype(np.int64)
    y0, fy = taps(h, out_h)
    by1 = np.rint(fy * 2048).astype(np.int64)
    by0 = 2048 - by1
    src = img.astype(np.int64)
    rows = src[:, x0] * ax0[:, None] + src[:, np.minimum(x0 + 1, w - 1)] * ax1[:, None]   # (h, out_w, C) x 2048
    r0, r1 = rows[np.clip(y0, 0, h - 1)] >> 4, rows[np.clip(y0 + 1, 0, h - 1)] >> 4
    out = (((by0[:, None, None] * r0) >> 16) + ((by1[:, None, None] * r1) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def warp_affine(img: np.ndarray, matrix: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """``cv2.warpAffine(img, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR)`` of a uint8 (H, W, C) image.

    ``matrix`` (2, 3) maps input to output pixels (pixel centres at integers); each output pixel samples the
    inverse-mapped point, rounded to OpenCV's 1/32-pixel grid as OpenCV rounds it, bilinearly (weights exact
    on that grid, the sum rounded half up); neighbours outside the image are black (``BORDER_CONSTANT``, 0).
    """
    h, w, c = img.shape
    m = np.asarray(matrix, np.float64)
    d = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]          # cv2.invertAffineTransform
    d = 1.0 / d if d != 0 else 0.0
    a11, a22, a12, a21 = m[1, 1] * d, m[0, 0] * d, -m[0, 1] * d, -m[1, 0] * d
    inv = np.array([[a11, a12, -a11 * m[0, 2] - a12 * m[1, 2]], [a21, a22, -a21 * m[0, 2] - a22 * m[1, 2]]])
    # OpenCV's fixed point: x and y terms rounded to 1/1024 pixel apart, their sum to 1/32 (halves up).
    xs, ys = np.arange(out_w, dtype=np.float64), np.arange(out_h, dtype=np.float64)[:, None]
    qx = (np.rint(inv[0, 0] * xs * 1024) + np.rint((inv[0, 1] * ys + inv[0, 2]) * 1024) + 16).astype(np.int64) >> 5
    qy = (np.rint(inv[1, 0] * xs * 1024) + np.rint((inv[1, 1] * ys + inv[1, 2]) * 1024) + 16).astype(np.int64) >> 5
    x0, y0 = qx >> 5, qy >> 5
    ax, ay = (qx & 31) / 32, (qy & 31) / 32
    src = img.astype(np.float64)
    out = np.zeros((out_h, out_w, c))
    for dy, wy in ((0, 1 - ay), (1, ay)):
        for dx, wx in ((0, 1 - ax), (1, ax)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            px = src[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
            out += np.where(inside, wx * wy, 0.0)[..., None] * px
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# The detector: YOLOX.

def letterbox(bgr: np.ndarray, size_hw: tuple[int, int] = DET_INPUT_SIZE) -> tuple[np.ndarray, float]:
    """The YOLOX input: (1, 3, H, W) float32 0..255 of the image scaled by ``r`` onto a 114-grey canvas; and ``r``."""
    h, w = bgr.shape[:2]
    r = min(size_hw[0] / h, size_hw[1] / w)
    nh, nw = int(h * r), int(w * r)
    canvas = np.full((*size_hw, 3), LETTERBOX_PAD, np.uint8)
    canvas[:nh, :nw] = resize_bilinear(bgr, nw, nh)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32), r


def decode_yolox(output: np.ndarray, size_hw: tuple[int, int] = DET_INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(1, A, 5 + classes) raw YOLOX output -> person boxes (A, 4) xyxy in input pixels and scores (A,).

    In float32 where the original is (it decodes in place in the output's float32 array).
    """
    pred = np.array(output, np.float32)[0]
    cells, strides = [], []
    for s in STRIDES:
        gh, gw = size_hw[0] // s, size_hw[1] // s
        gx, gy = np.meshgrid(np.arange(gw), np.arange(gh))
        cells.append(np.stack([gx, gy], -1).reshape(-1, 2))
        strides.append(np.full((gh * gw, 1), s))
    cells, strides = np.concatenate(cells), np.concatenate(strides)
    if pred.ndim != 2 or pred.shape[0] != len(cells) or pred.shape[1] < 6:
        raise ValueError(f"detector output has shape {tuple(np.shape(output))}; YOLOX at {size_hw[0]}x{size_hw[1]} "
                         f"gives (1, {len(cells)}, 5 + classes)")
    xy = ((pred[:, :2] + cells) * strides).astype(np.float32)
    wh = (np.exp(pred[:, 2:4]) * strides).astype(np.float32)
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    return boxes, pred[:, 4] * pred[:, 5]      # objectness x person (class 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thr: float = NMS_THR) -> list[int]:
    """Greedy NMS, best first; boxes overlapping a kept one by IoU > ``iou_thr`` go (areas with +1 pixel)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou_thr]
    return keep


def person_boxes(output: np.ndarray, ratio: float, size_hw: tuple[int, int] = DET_INPUT_SIZE) -> np.ndarray:
    """Raw YOLOX output -> (N, 4) person boxes xyxy in photo pixels, best first (the original's thresholds)."""
    boxes, scores = decode_yolox(output, size_hw)
    boxes = boxes / np.float32(ratio)
    ok = scores > DET_SCORE_THR
    boxes, scores = boxes[ok], scores[ok]
    keep = [i for i in nms(boxes, scores) if scores[i] > BOX_SCORE_THR]
    return boxes[keep].reshape(-1, 4).astype(np.float64)


# ---------------------------------------------------------------------------------------------------------
# The pose model: RTMPose with SimCC heads.

def box_center_scale(box: Sequence[float], input_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """xyxy box -> centre and (w, h) of the region cut out: the box x1.25, then widened or heightened to the
    model's aspect."""
    x1, y1, x2, y2 = (float(v) for v in box)
    center = np.array([x1 + x2, y1 + y2]) * 0.5
    bw, bh = (x2 - x1) * BBOX_PADDING, (y2 - y1) * BBOX_PADDING
    aspect = input_wh[0] / input_wh[1]
    scale = np.array([bw, bw / aspect]) if bw > bh * aspect else np.array([bh * aspect, bh])
    return center, scale


def crop_matrix(center: np.ndarray, scale: np.ndarray, input_wh: tuple[int, int]) -> np.ndarray:
    """(2, 3) affine map from photo to crop pixels: centre -> crop centre, width ``scale[0]`` -> ``input_wh[0]``.

    Solved, as OpenCV's ``getAffineTransform``, from three float32 point pairs (centre, half a width up, and
    the point a quarter turn from there).
    """
    def three(c, half_w):
        c = np.asarray(c, np.float64)
        p0, p1 = c.astype(np.float32), (c + [0.0, -half_w]).astype(np.float32)
        d = p0 - p1
        return np.stack([p0, p1, p1 + np.array([-d[1], d[0]], np.float32)]).astype(np.float64)

    w, h = input_wh
    src = three(center, scale[0] * 0.5)
    dst = three([w * 0.5, h * 0.5], w * 0.5)
    a = np.zeros((6, 6))
    a[0::2, 0:2], a[0::2, 2] = src, 1
    a[1::2, 3:5], a[1::2, 5] = src, 1
    return np.linalg.solve(a, dst.reshape(-1)).reshape(2, 3)


def pose_input(bgr: np.ndarray, box: Sequence[float], input_wh: tuple[int, int]):
    """One box's RTMPose input (1, 3, h, w) float32, with the crop's centre and (w, h) in photo pixels."""
    center, scale = box_center_scale(box, input_wh)
    crop = warp_affine(bgr, crop_matrix(center, scale, input_wh), *input_wh)
    x = (crop - POSE_MEAN) / POSE_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32), center, scale


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, center: np.ndarray, scale: np.ndarray,
                 input_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(1, K, Wx), (1, K, Wy) SimCC outputs -> (K, 2) keypoints in photo pixels and (K,) scores.

    Each keypoint lies at the argmax of its x and y distributions / ``SIMCC_SPLIT_RATIO`` in the crop; its score
    is the smaller of the two maxima (a score <= 0 puts it at crop position -0.5, as the original).
    """
    sx, sy = np.asarray(simcc_x, np.float64)[0], np.asarray(simcc_y, np.float64)[0]
    locs = np.stack([np.argmax(sx, -1), np.argmax(sy, -1)], -1).astype(np.float64)
    scores = np.minimum(sx.max(-1), sy.max(-1))
    locs[scores <= 0] = -1
    kp = locs / SIMCC_SPLIT_RATIO / np.asarray(input_wh, np.float64) * scale + center - scale / 2
    return kp, scores


def coco_to_openpose(keypoints: np.ndarray, scores: np.ndarray,
                     threshold: float = KEYPOINT_THR) -> tuple[np.ndarray, np.ndarray]:
    """COCO(-WholeBody) body keypoints (..., >=17, 2) and scores (..., >=17) -> OpenPose's 18, as the original:
    the neck is the shoulders' midpoint, scored 1 when both shoulders score above ``threshold``, else 0."""
    kp, sc = np.asarray(keypoints, np.float64), np.asarray(scores, np.float64)
    neck = kp[..., [5, 6], :].mean(-2)
    neck_score = ((sc[..., 5] > threshold) & (sc[..., 6] > threshold)).astype(np.float64)
    out_kp = np.stack([neck if j is None else kp[..., j, :] for j in COCO_FOR_OPENPOSE], -2)
    out_sc = np.stack([neck_score if j is None else sc[..., j] for j in COCO_FOR_OPENPOSE], -1)
    return out_kp, out_sc


# ---------------------------------------------------------------------------------------------------------
# The two ONNX sessions.

def _session(path: str, providers):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(path, providers=list(providers))
    except Exception as err:       # onnxruntime's own exception types (bad protobuf, unknown ops, ...)
        raise ValueError(f"cannot load the ONNX model {path}: {type(err).__name__}: {err}") from err


def _input_hw(session, default: tuple[int, int]) -> tuple[int, int]:
    shape = session.get_inputs()[0].shape
    hw = shape[2:4] if len(shape) == 4 else ()
    return tuple(int(v) for v in hw) if len(hw) == 2 and all(isinstance(v, int) for v in hw) else default


class DWPose:
    """The DWPose backend: ``DWPose(model_dir)(rgb)`` -> the photo's persons as OpenPose keypoints.

    ``model_dir`` holds ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx`` (the original IMAGPose's
    ``weights/ckpts``; other YOLOX / RTMPose-SimCC exports with those inputs and outputs work too). Needs
    ``onnxruntime`` (``pip install imagpose-jax[pose]``); ``providers`` default to CUDA when onnxruntime has it,
    else the CPU.
    """

    def __init__(self, model_dir: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 keypoint_threshold: float = KEYPOINT_THR, full_image_fallback: bool = False):
        model_dir = os.fspath(model_dir)
        det_path, pose_path = (os.path.join(model_dir, f) for f in (DETECTOR_FILE, POSE_FILE))
        missing = [p for p in (det_path, pose_path) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"DWPose model file(s) not found: {', '.join(missing)} (the folder needs {DETECTOR_FILE}, the YOLOX-L "
                f"person detector, and {POSE_FILE}, the DWPose whole-body model: the original IMAGPose's "
                f"weights/ckpts)")
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError("the DWPose backend runs on onnxruntime: pip install onnxruntime "
                              "(or imagpose-jax[pose])") from err
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.detector = _session(det_path, providers)
        self.pose_model = _session(pose_path, providers)
        self.det_hw = _input_hw(self.detector, DET_INPUT_SIZE)
        self.pose_wh = _input_hw(self.pose_model, POSE_INPUT_SIZE)[::-1]
        self.keypoint_threshold = keypoint_threshold
        self.full_image_fallback = full_image_fallback

    def detect(self, bgr: np.ndarray) -> np.ndarray:
        """(N, 4) person boxes xyxy in photo pixels, best first."""
        x, ratio = letterbox(bgr, self.det_hw)
        out = self.detector.run(None, {self.detector.get_inputs()[0].name: x})[0]
        return person_boxes(out, ratio, self.det_hw)

    def wholebody(self, bgr: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 133, 2) whole-body keypoints in photo pixels and (N, 133) scores, one per box."""
        kps, scores = [], []
        name = self.pose_model.get_inputs()[0].name
        for box in boxes:
            x, center, scale = pose_input(bgr, box, self.pose_wh)
            simcc_x, simcc_y = self.pose_model.run(None, {name: x})[:2]
            kp, sc = decode_simcc(simcc_x, simcc_y, center, scale, self.pose_wh)
            kps.append(kp)
            scores.append(sc)
        k = self.pose_model.get_outputs()[0].shape[1]
        k = k if isinstance(k, int) else NUM_WHOLEBODY
        return (np.stack(kps) if kps else np.zeros((0, k, 2))), (np.stack(scores) if scores else np.zeros((0, k)))

    def people(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All persons of a uint8 (H, W, 3) RGB photo: (N, 18, 2) OpenPose keypoints, (N, 18) scores."""
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {rgb.dtype} {rgb.shape}")
        bgr = np.ascontiguousarray(rgb[..., ::-1])   # the original feeds both models OpenCV's BGR
        boxes = self.detect(bgr)
        if len(boxes) == 0 and self.full_image_fallback:
            boxes = np.array([[0.0, 0.0, rgb.shape[1], rgb.shape[0]]])
        kp, sc = self.wholebody(bgr, boxes)
        return coco_to_openpose(kp, sc, self.keypoint_threshold)

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        """The photo's pose: (18, 3) float32 ``(x, y, score)`` in photo pixels of the person whose 18 scores have
        the highest mean (the original's choice); None when no person is detected. Missing points (score <=
        the threshold, or off the photo's left or top edge, which ``render_pose`` cannot draw) are (-1, -1, 0)."""
        kp, sc = self.people(rgb)
        if len(kp) == 0:
            return None
        best = int(np.argmax(sc.mean(-1)))
        out = np.concatenate([kp[best], sc[best, :, None]], -1).astype(np.float32)
        out[(sc[best] <= self.keypoint_threshold) | np.any(out[:, :2] < 0, -1)] = (-1, -1, 0)
        assert out.shape == (NUM_KEYPOINTS, 3)
        return out
