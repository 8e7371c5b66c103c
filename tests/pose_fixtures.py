"""The DWPose stand-ins shared by the pose tests (test_pose_extract.py, test_generate_photos.py): two ONNX files with
the real ones' inputs and outputs, exported by `torch.onnx.export` from random-weight modules (see
test_pose_extract.py's docstring), and a photo of two 'persons' the stand-in detector finds."""
import numpy as np
import pytest

from imagpose_jax.data import dwpose

PHOTO_HW = (720, 540)
R = min(640 / PHOTO_HW[0], 640 / PHOTO_HW[1])        # the letterbox scale


def _logit(p):
    return float(np.log(p / (1 - p)))


# Planted detector boxes, in letterbox pixels: (centre x, centre y, w, h, stride, objectness, class, class score).
PLANTED = {
    "person_a": (130, 330, 180, 540, 32, 0.95, 0, 0.95),   # score 0.9025
    "overlap_a": (140, 320, 170, 520, 16, 0.80, 0, 0.75),  # 0.6, IoU with person_a > 0.45: NMS removes it
    "person_b": (360, 330, 200, 460, 8, 0.90, 0, 0.90),    # 0.81
    "weak": (300, 40, 60, 50, 8, 0.50, 0, 0.40),           # 0.2: past NMS's 0.1, not the 0.3 after it
    "bicycle": (200, 300, 150, 150, 16, 0.95, 1, 0.95),    # another class
}


def _detector_bias() -> np.ndarray:
    bias = np.zeros((8400, 85), np.float32)
    bias[:, 4:] = _logit(1e-4)
    offsets = {8: 0, 16: 6400, 32: 8000}
    for cx, cy, w, h, s, obj, cls, p in PLANTED.values():
        gx, gy = int(cx // s), int(cy // s)
        i = offsets[s] + gy * (640 // s) + gx
        bias[i, :4] = (cx / s - gx, cy / s - gy, np.log(w / s), np.log(h / s))
        bias[i, 4] = _logit(obj)
        bias[i, 5 + cls] = _logit(p)
    return bias


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="the stand-in ONNX files are exported by torch")
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package")
    from torch import nn
    from torch.nn import functional as F

    class TinyYOLOX(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("bias", torch.from_numpy(_detector_bias()))
            self.read = nn.Linear(3, 85, bias=False)
            nn.init.normal_(self.read.weight, std=1e-5)

        def forward(self, x):
            feats = torch.cat([F.avg_pool2d(x, s).flatten(2) for s in (8, 16, 32)], -1).transpose(1, 2)
            raw = self.bias + self.read(feats)                                       # (1, 8400, 85)
            gate = torch.sigmoid(50 * (x[:, :, :32, :32].mean() / 255 - 0.1))      # the photo's top-left corner
            return torch.cat([raw[..., :4], torch.sigmoid(raw[..., 4:]) * gate], -1)

    class TinySimCC(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_x, self.conv_y = nn.Conv1d(1, 133, 31, padding=15), nn.Conv1d(1, 133, 31, padding=15)
            self.register_buffer("amp", torch.where(torch.arange(133) % 4 == 3, 0.2, 1.0)[:, None])

        def forward(self, x):
            g = x.mean(1, keepdim=True)                                       # (1, 1, 384, 288)
            px = F.interpolate(g.mean(2), scale_factor=2.0, mode="linear")    # (1, 1, 576)
            py = F.interpolate(g.mean(3), scale_factor=2.0, mode="linear")    # (1, 1, 768)
            return torch.sigmoid(3 * self.conv_x(px)) * self.amp, torch.sigmoid(3 * self.conv_y(py)) * self.amp

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("dwpose")
    with torch.no_grad():
        for model, shape, name, outs in ((TinyYOLOX(), (1, 3, 640, 640), dwpose.DETECTOR_FILE, ["output"]),
                                         (TinySimCC(), (1, 3, 384, 288), dwpose.POSE_FILE, ["simcc_x", "simcc_y"])):
            torch.onnx.export(model.eval(), (torch.zeros(shape),), str(d / name), input_names=["input"],
                              output_names=outs, dynamo=False)
    return d


def photo(bright: bool = True) -> np.ndarray:
    """A (720, 540) RGB photo: a light backdrop with two 'persons' of coloured blobs (or all dark)."""
    h, w = PHOTO_HW
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([200 - 0.05 * yy, 190 - 0.04 * xx, 180 + 0.02 * (xx - yy)], -1)
    rng = np.random.default_rng(3)
    for cx, cy, bw, bh in ((130, 330, 180, 540), (360, 330, 200, 460)):
        for _ in range(6):
            x0, y0 = (cx + rng.uniform(-0.3, 0.3) * bw) / R, (cy + rng.uniform(-0.4, 0.4) * bh) / R
            sx, sy = rng.uniform(8, 30) / R, rng.uniform(10, 50) / R
            blob = np.exp(-(((xx - x0) / sx) ** 2 + ((yy - y0) / sy) ** 2) / 2)
            img = img * (1 - blob[..., None]) + blob[..., None] * rng.uniform(0, 255, 3)
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255)
    return (img if bright else img * 0.1).astype(np.uint8)


# Two planted poses of the 17 COCO body keypoints in the pose model's 288x384 crop (x, y): A standing with the arms
# down, B with the arms raised and the legs apart (the person faces the camera: their left is the crop's right).
POSE_A = ((144, 70), (152, 62), (136, 62), (162, 66), (126, 66), (174, 110), (114, 110), (184, 160), (104, 160),
          (188, 205), (100, 205), (162, 210), (126, 210), (164, 270), (124, 270), (166, 330), (122, 330))
POSE_B = POSE_A[:7] + ((200, 80), (88, 80), (210, 40), (78, 40), (162, 210), (126, 210), (180, 270), (108, 270),
                       (196, 330), (92, 330))
POSE_SWITCH = -0.25   # the crop's mean after DWPose's normalisation: above it pose A (photo()), below it B (dimmed)


@pytest.fixture(scope="module")
def posed_onnx_dir(onnx_dir, tmp_path_factory):
    """onnx_dir's detector with a pose model whose SimCC peaks sit at a planted pose: POSE_A for a crop brighter
    than POSE_SWITCH (`photo()`), POSE_B for a darker one (`photo() * 0.6`); the other 116 keypoints at the centre."""
    torch = pytest.importorskip("torch", reason="the stand-in ONNX files are exported by torch")
    import shutil
    from torch import nn

    def peaks(coords, bins):
        grid = np.arange(bins)[None, :]
        return np.exp(-0.5 * ((grid - 2 * np.asarray(coords, np.float64)[:, None]) / 2.0) ** 2).astype(np.float32)

    def planted(pose):
        xy = np.array(list(pose) + [(144, 192)] * (133 - len(pose)))
        return torch.from_numpy(peaks(xy[:, 0], 576)), torch.from_numpy(peaks(xy[:, 1], 768))

    class PlantedSimCC(nn.Module):
        def __init__(self):
            super().__init__()
            for name, pose in (("a", POSE_A), ("b", POSE_B)):
                x, y = planted(pose)
                self.register_buffer(f"{name}_x", x[None])
                self.register_buffer(f"{name}_y", y[None])

        def forward(self, x):
            g = torch.sigmoid(20 * (x.mean() - POSE_SWITCH))
            return g * self.a_x + (1 - g) * self.b_x, g * self.a_y + (1 - g) * self.b_y

    d = tmp_path_factory.mktemp("dwpose_posed")
    shutil.copy(onnx_dir / dwpose.DETECTOR_FILE, d / dwpose.DETECTOR_FILE)
    with torch.no_grad():
        torch.onnx.export(PlantedSimCC().eval(), (torch.zeros((1, 3, 384, 288)),), str(d / dwpose.POSE_FILE),
                          input_names=["input"], output_names=["simcc_x", "simcc_y"], dynamo=False)
    return d
