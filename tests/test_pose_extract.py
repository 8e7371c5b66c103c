"""`imagpose pose` / DWPose against rtmlib, an independent implementation of the same ONNX pipeline.

No DWPose weights exist here, so the two ONNX files are exported by `torch.onnx.export` from random-weight
stand-ins with the real files' inputs and outputs: a "YOLOX" mapping (1, 3, 640, 640) to (1, 8400, 85) whose
output is a fixed bias (planted boxes: two persons, one weaker person box overlapping the first for NMS to
remove, one person box scoring 0.2, one box of another class) plus a small linear read of the pooled image,
gated off for a dark photo; and an "RTMPose" mapping (1, 3, 384, 288) to SimCC (1, 133, 576) and (1, 133, 768)
from random 1-D convolutions of the crop's row and column profiles (some keypoints always scoring below 0.3).

rtmlib needs OpenCV, which the package does not: `reference_site` installs rtmlib and opencv-python-headless
(`pip install --no-deps --target`) into a private folder (cached in ~/.cache/imagpose-jax, or the folder
named by IMAGPOSE_POSE_REF_SITE) and the reference runs in a subprocess importing them from there. One
adjustment makes rtmlib the original DWPose: its SimCC score is the mean of the x and y maxima, the
original's (IMAGPose's dwpose, DWPose's onnxpose.py) their minimum, so the subprocess swaps rtmlib's
score combination for the minimum. Offline (or IMAGPOSE_POSE_REF_SITE=off) those comparisons skip.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagpose_jax.data import dwpose
from imagpose_jax.data.pose import KEYPOINT_NAMES, load_openpose_json, render_pose
from ref_site import private_site

ort = pytest.importorskip("onnxruntime", reason="the DWPose backend runs on onnxruntime")

RTMLIB_VERSION = "0.0.16"
OPENCV_VERSION = "4.13.0.92"

from pose_fixtures import PLANTED, R, onnx_dir, photo  # noqa: F401 (onnx_dir: a fixture)


# ----------------------------------------------------------------------------------------------
# The reference: rtmlib (+ OpenCV) in a subprocess.

def reference_site() -> Path:
    specs = [f"rtmlib=={RTMLIB_VERSION}", f"opencv-python-headless=={OPENCV_VERSION}"]
    return private_site("IMAGPOSE_POSE_REF_SITE", f"pose-ref-rtmlib{RTMLIB_VERSION}-opencv{OPENCV_VERSION}", specs,
                        ("rtmlib", "cv2"))


REFERENCE = r'''
import sys
site, models, work = sys.argv[1:4]
sys.path.insert(0, site)
import cv2
import numpy as np
import rtmlib
from rtmlib.tools.pose_estimation import post_processings

# The original DWPose scores a keypoint min(max_x, max_y); rtmlib 0.0.16 the mean.
post_processings._combine_axis_scores = lambda x, y, method: np.minimum(x, y)

inp = dict(np.load(work + "/inputs.npz"))
out = {}
det = rtmlib.YOLOX(models + "/yolox_l.onnx", model_input_size=(640, 640), nms_thr=0.45, score_thr=0.3,
                   det_mode="multiclass", backend="onnxruntime", device="cpu")
pose = rtmlib.RTMPose(models + "/dw-ll_ucoco_384.onnx", model_input_size=(288, 384), backend="onnxruntime",
                      device="cpu")
pose_op = rtmlib.RTMPose(models + "/dw-ll_ucoco_384.onnx", model_input_size=(288, 384), to_openpose=True,
                         backend="onnxruntime", device="cpu")
for name in ("photo", "dark"):
    bgr = np.ascontiguousarray(inp[name][..., ::-1])        # the original feeds OpenCV's BGR
    boxes, classes = det(bgr)
    boxes = np.asarray(boxes).reshape(-1, 4)[np.asarray(classes).reshape(-1) == 0]
    out[name + "_boxes"] = boxes
    # with no box, rtmlib (as the original) estimates on the whole image
    out[name + "_kp"], out[name + "_sc"] = pose(bgr, bboxes=list(boxes))
    out[name + "_kp_op"], out[name + "_sc_op"] = pose_op(bgr, bboxes=list(boxes))
# OpenCV's resampling itself
img = inp["noise"]
for h, w in ((1280, 960), (500, 333), (100, 60)):
    src = img[:h, :w]
    r = min(640 / h, 640 / w)
    out[f"resize_{h}x{w}"] = cv2.resize(src, (int(w * r), int(h * r)), interpolation=cv2.INTER_LINEAR)
for i, m in enumerate(inp["matrices"]):
    out[f"warp_{i}"] = cv2.warpAffine(img[:500, :333], m, (288, 384), flags=cv2.INTER_LINEAR)
np.savez(work + "/out.npz", **out)
'''

WARP_BOXES = ((10, 20, 300, 480), (-50, -30, 200, 600), (100.3, 50.7, 180.2, 200.9), (0, 0, 333, 500))


@pytest.fixture(scope="module")
def ref(onnx_dir, tmp_path_factory):
    site = reference_site()
    work = tmp_path_factory.mktemp("pose_ref")
    noise = np.random.default_rng(1).integers(0, 256, (1280, 960, 3), dtype=np.uint8)
    matrices = np.stack([dwpose.crop_matrix(*dwpose.box_center_scale(b, (288, 384)), (288, 384)) for b in WARP_BOXES])
    inputs = {"photo": photo(), "dark": photo(bright=False), "noise": noise, "matrices": matrices}
    np.savez(work / "inputs.npz", **inputs)
    proc = subprocess.run([sys.executable, "-c", REFERENCE, str(site), str(onnx_dir), str(work)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"rtmlib reference failed:\n{proc.stderr[-4000:]}"
    return inputs, dict(np.load(work / "out.npz"))


@pytest.fixture(scope="module")
def backend(onnx_dir):
    return dwpose.DWPose(onnx_dir, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------

def test_resampling_is_opencvs(ref):
    inputs, out = ref
    img = inputs["noise"]
    for h, w in ((1280, 960), (500, 333), (100, 60)):
        want = out[f"resize_{h}x{w}"]
        np.testing.assert_array_equal(dwpose.resize_bilinear(img[:h, :w], want.shape[1], want.shape[0]), want)
    for i, m in enumerate(inputs["matrices"]):
        np.testing.assert_array_equal(dwpose.warp_affine(img[:500, :333], m, 288, 384), out[f"warp_{i}"])


def test_detector_matches_rtmlib(ref, backend):
    inputs, out = ref
    boxes = backend.detect(np.ascontiguousarray(inputs["photo"][..., ::-1]))
    np.testing.assert_allclose(boxes, out["photo_boxes"], atol=1e-4)
    # the planted persons, and only they: NMS removed the overlap, 0.3 the weak box, the class filter the bicycle
    planted = np.array([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] for cx, cy, w, h, *_ in
                        (PLANTED["person_a"], PLANTED["person_b"])]) / R
    np.testing.assert_allclose(boxes, planted, atol=2.0)


def test_wholebody_and_openpose_match_rtmlib(ref, backend):
    inputs, out = ref
    rgb = inputs["photo"]
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    kp, sc = backend.wholebody(bgr, backend.detect(bgr))
    assert kp.shape == (2, 133, 2) and sc.shape == (2, 133)
    np.testing.assert_allclose(kp, out["photo_kp"], atol=1e-3)
    np.testing.assert_allclose(sc, out["photo_sc"], rtol=1e-6)
    assert (sc > 0.3).any() and (sc <= 0.3).any()

    kp18, sc18 = backend.people(rgb)
    np.testing.assert_allclose(kp18, out["photo_kp_op"][:, :18], atol=1e-3)
    # rtmlib scores the neck min(shoulders), the original 1 if both shoulders are above 0.3: same visibility
    np.testing.assert_array_equal(sc18 > 0.3, out["photo_sc_op"][:, :18] > 0.3)
    np.testing.assert_allclose(np.delete(sc18, 1, 1), np.delete(out["photo_sc_op"][:, :18], 1, 1), rtol=1e-6)

    # the pose: the person with the best mean of the 18 scores (neck 0/1); points scoring at most 0.3, or off
    # the photo's left or top edge, missing
    neck = (out["photo_sc_op"][:, 1] > 0.3).astype(float)
    ranked = np.concatenate([out["photo_sc_op"][:, :1], neck[:, None], out["photo_sc_op"][:, 2:18]], 1)
    best = int(np.argmax(ranked.mean(1)))
    pose = backend(rgb)
    visible = (out["photo_sc_op"][best, :18] > 0.3) & (out["photo_kp_op"][best, :18] >= 0).all(-1)
    assert 3 <= visible.sum() < 18
    assert pose.shape == (18, 3) and pose.dtype == np.float32
    np.testing.assert_array_equal(pose[:, 2] > 0, visible)
    np.testing.assert_allclose(pose[visible, :2], out["photo_kp_op"][best, :18][visible], atol=1e-3)
    np.testing.assert_array_equal(pose[~visible], np.tile([-1, -1, 0], ((~visible).sum(), 1)))


def test_no_person(ref, backend, onnx_dir):
    inputs, out = ref
    dark = inputs["dark"]
    assert len(out["dark_boxes"]) == 0 and len(backend.detect(np.ascontiguousarray(dark[..., ::-1]))) == 0
    assert backend(dark) is None
    # the original's fallback: the pose model on the whole photo
    fallback = dwpose.DWPose(onnx_dir, providers=["CPUExecutionProvider"], full_image_fallback=True)
    kp18, sc18 = fallback.people(dark)
    np.testing.assert_allclose(kp18, out["dark_kp_op"][:, :18], atol=1e-3)
    np.testing.assert_array_equal(sc18 > 0.3, out["dark_sc_op"][:, :18] > 0.3)


def test_coco_to_openpose_order():
    coco = ("nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow",
            "l_wrist", "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle")
    kp = np.stack([np.arange(133.0), np.arange(133.0) * 10], -1)
    sc = np.full(133, 0.9)
    sc[6] = 0.3                                      # right shoulder at the threshold: no neck
    op_kp, op_sc = dwpose.coco_to_openpose(kp, sc)
    for i, name in enumerate(KEYPOINT_NAMES):
        if name == "neck":
            np.testing.assert_allclose(op_kp[i], (kp[5] + kp[6]) / 2)
            assert op_sc[i] == 0
        else:
            assert op_kp[i, 0] == coco.index(name), name
    sc[6] = 0.31
    assert dwpose.coco_to_openpose(kp, sc)[1][1] == 1


def test_cli_writes_json_and_rendering(onnx_dir, backend, tmp_path, capsys):
    from imagpose_jax.cli import main
    from imagpose_jax.pose_extract import extract_poses

    me, dark = tmp_path / "me.png", tmp_path / "night.jpg"
    Image.fromarray(photo()).save(me)
    Image.fromarray(photo(bright=False)).save(dark, quality=95)
    out = tmp_path / "poses"
    assert main(["pose", str(me), str(dark), "--out", str(out), "--dwpose", str(onnx_dir), "--cpu"]) == 0
    logs = capsys.readouterr()
    assert "no person detected" in logs.err and "night.jpg" in logs.err

    (kp, none) = extract_poses([me, dark], backend)
    assert none is None
    data = json.loads((out / "me_pose.json").read_text())
    assert data["version"] == 1.3 and (data["canvas_width"], data["canvas_height"]) == (540, 720)
    flat = np.asarray(data["people"][0]["pose_keypoints_2d"], np.float32).reshape(18, 3)
    missing = kp[:, 2] <= 0
    np.testing.assert_array_equal(flat[~missing], kp[~missing])
    np.testing.assert_array_equal(flat[missing], 0)
    # our reader gets the same keypoints back, -1 where missing
    np.testing.assert_array_equal(load_openpose_json(out / "me_pose.json"), kp[:, :2])
    png = np.asarray(Image.open(out / "me_pose.png"))
    np.testing.assert_array_equal(png, render_pose(kp[:, :2], 720, 540))
    assert png.any()

    empty = json.loads((out / "night_pose.json").read_text())
    assert empty["people"] == [] and not (out / "night_pose.png").exists()
    with pytest.raises(ValueError, match="no people"):
        load_openpose_json(out / "night_pose.json")


def test_missing_model_file_is_named(onnx_dir, tmp_path):
    shutil.copy(onnx_dir / dwpose.DETECTOR_FILE, tmp_path / dwpose.DETECTOR_FILE)
    with pytest.raises(FileNotFoundError, match=dwpose.POSE_FILE) as err:
        dwpose.DWPose(tmp_path)
    assert dwpose.DETECTOR_FILE not in str(err.value).split("(")[0]
    from imagpose_jax.pose_extract import main

    Image.fromarray(photo()).save(tmp_path / "me.png")
    with pytest.raises(SystemExit, match=f"error: DWPose model file.*{dwpose.POSE_FILE}"):
        main([str(tmp_path / "me.png"), "--out", str(tmp_path / "o"), "--dwpose", str(tmp_path)])
