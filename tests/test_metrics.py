"""Metrics against their references: scikit-image (SSIM, PSNR), the `lpips` package (LPIPS), pytorch-fid and
torchvision (Inception features, Fréchet distance), on random weights written by those libraries.

The LPIPS/FID references need torchvision. There is no CPU build of torchvision, and the CUDA build on PyPI
cannot load its C++ ops with the CPU torch used here; worse, once installed, `import torchvision` raises and
takes `transformers.Dinov2Model` down with it. So torchvision, lpips and pytorch-fid are never installed into
the environment: `reference_site` installs the pinned versions (`pip install --no-deps --target`) into a
private folder (cached in ~/.cache/imagpose-jax, or the folder named by IMAGPOSE_METRICS_REF_SITE), and the
reference runs in a subprocess that imports them from there. The only shim: torchvision 0.28 registers fake
kernels for two of its C++ ops without checking that they loaded, so the subprocess declares those two op
schemas first (torchvision's model code never calls them). Without the folder (offline, or
IMAGPOSE_METRICS_REF_SITE=off) those tests skip, saying why. The subprocess's outputs (random-weight files in
the libraries' own formats, reference values) are cached under a hash of everything that determines them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert_weights.core import ConversionError, load_torch_file, save_torch_file
from imagpose_jax.metrics import (activation_statistics, evaluate_pairs, fid_from_features, frechet_distance,
                                  inception_features, l1, load_inception, load_lpips, lpips_distance, psnr, ssim)
from ref_site import cache_root, private_site

LPIPS_VERSION, PYTORCH_FID_VERSION = "0.1.4", "0.3.0"
SSIM_TOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Test images.

def noisy_pair(shape, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    return x, np.clip(x + noise * rng.standard_normal(shape), 0, 1)


def structured_pair(h=80, w=64):
    """Gradients, flat blocks (zero variance), a checkerboard, a saturated corner; the second image is a
    shifted, darkened, partly blurred copy."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    a = np.stack([xx, yy, 0.5 * (xx + yy)], -1)
    a[10:40, 5:30] = (0.2, 0.7, 0.4)
    a[45:, 35:] = (((np.add.outer(np.arange(h - 45), np.arange(w - 35)) // 3) % 2)[..., None] * 0.9)
    a[:8, -8:] = 1.0
    b = np.roll(a, (2, -3), axis=(0, 1)) * 0.85
    b[20:60, 20:50] = 0.5 * (b[20:60, 20:50] + b[21:61, 21:51])
    return np.stack([a, a]), np.stack([b, a * 0.999])


def skimage_ssim(x, y, **kw):
    from skimage.metrics import structural_similarity
    return np.array([structural_similarity(a, b, channel_axis=-1, data_range=1.0, **kw) for a, b in zip(x, y)])


# ----------------------------------------------------------------------------------------------
# SSIM, PSNR, L1 against scikit-image.

SSIM_CASES = {  # ours -> skimage keyword arguments
    "protocol_51_uniform": ({}, dict(win_size=51)),
    "gaussian_wang": (dict(gaussian_weights=True, use_sample_covariance=False, win_size=None),
                      dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)),
    "gaussian_win7_reflect": (dict(gaussian_weights=True, win_size=7), dict(gaussian_weights=True, win_size=7)),
    "uniform_win7": (dict(win_size=7), dict(win_size=7)),
}


@pytest.mark.parametrize("case", sorted(SSIM_CASES))
def test_ssim_matches_skimage(case):
    pytest.importorskip("skimage", reason="scikit-image is the SSIM reference (in the test extra)")
    ours_kw, ref_kw = SSIM_CASES[case]
    for x, y in (noisy_pair((2, 64, 72, 3)), structured_pair()):
        x, y = x.astype(np.float32), y.astype(np.float32)
        ref = skimage_ssim(x.astype(np.float64), y.astype(np.float64), **ref_kw)     # float64 reference
        got = np.asarray(ssim(x, y, **ours_kw))
        assert got.shape == (2,)
        assert np.abs(got - ref).max() <= SSIM_TOL, (case, got, ref)
    assert float(ssim(x[0], x[0], **ours_kw)) == pytest.approx(1.0, abs=1e-6)   # single image -> scalar


def test_ssim_under_jit_and_uint8_scale():
    pytest.importorskip("skimage", reason="scikit-image is the SSIM reference (in the test extra)")
    from skimage.metrics import structural_similarity
    x, y = noisy_pair((2, 60, 60, 3), seed=3)
    x8, y8 = (np.round(x * 255).astype(np.uint8), np.round(y * 255).astype(np.uint8))
    got = jax.jit(lambda a, b: ssim(a, b))(jnp.asarray(x8 / 255, jnp.float32), jnp.asarray(y8 / 255, jnp.float32))
    ref = [structural_similarity(a, b, channel_axis=-1, win_size=51) for a, b in zip(x8, y8)]  # uint8: range 255
    assert np.abs(np.asarray(got) - ref).max() <= SSIM_TOL


def test_psnr_and_l1():
    pytest.importorskip("skimage", reason="scikit-image is the PSNR reference (in the test extra)")
    from skimage.metrics import peak_signal_noise_ratio
    for x, y in (noisy_pair((3, 40, 50, 3), seed=1), structured_pair()):      # PSNRs of 10 to 65 dB
        x, y = x.astype(np.float32), y.astype(np.float32)
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        ref = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(x64, y64)]
        assert np.abs(np.asarray(psnr(x, y)) - ref).max() <= 2e-5
        assert np.abs(np.asarray(l1(x, y)) - np.abs(x64 - y64).mean(axis=(1, 2, 3))).max() <= 1e-7
    assert float(psnr(x[0], x[0])) == np.inf


def test_pixel_metric_errors():
    x = np.zeros((2, 64, 64, 3), np.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(x, x[:, :, :60])
    with pytest.raises(ValueError, match="smaller than the 51-pixel SSIM window"):
        ssim(x[:, :50], x[:, :50])
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        psnr(x.astype(np.uint8), x.astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\].*max 255.*divide by 255"):
        l1(x + 255, x)
    with pytest.raises(ValueError, match=r"min -1.*\(x \+ 1\) / 2"):
        l1(x - 1, x)
    with pytest.raises(ValueError, match="odd"):
        ssim(x, x, win_size=8)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        l1(x[0, 0], x[0, 0])


# ----------------------------------------------------------------------------------------------
# The reference subprocess (real torchvision / lpips / pytorch-fid from a private folder).

def _torchvision_spec() -> str:
    torch = pytest.importorskip("torch", reason="the LPIPS/FID references run on torch")
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if major != 2:
        pytest.skip(f"no torchvision pin known for torch {torch.__version__}")
    return f"torchvision==0.{minor + 15}.*"            # torch 2.13 <-> torchvision 0.28


def reference_site() -> Path:
    """The private folder holding torchvision, lpips and pytorch-fid (installed on first use)."""
    specs = [_torchvision_spec(), f"lpips=={LPIPS_VERSION}", f"pytorch-fid=={PYTORCH_FID_VERSION}"]
    return private_site("IMAGPOSE_METRICS_REF_SITE",
                        "metrics-ref-" + "-".join(s.replace("==", "").replace("*", "x") for s in specs), specs, ("lpips",))


REFERENCE = r'''
import json, os, sys, types, importlib.util
site, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, site)
import numpy as np
import torch
from torch import nn

# torchvision's C++ ops are built against CUDA torch. If they do not load, declare the two ops that
# torchvision/_meta_registrations.py registers fake kernels for without checking (never called here).
tv_dir = os.path.dirname(importlib.util.find_spec("torchvision").origin)
try:
    torch.ops.load_library(os.path.join(tv_dir, "_C.so"))
except (OSError, RuntimeError):
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import torchvision
import lpips
import lpips.pretrained_networks
from pytorch_fid import fid_score
from pytorch_fid import inception as pi

torch.manual_seed(0)
inp = dict(np.load(os.path.join(work, "inputs.npz")))
out, files = {}, {}
nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def randomize(model):
    """Random weights that keep activations O(1) through deep stacks; BatchNorm statistics included."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def small_classifier(model, dims):
    """The ImageNet head is skipped by our loader; shrink it (same keys, small shapes) to keep files small."""
    layers = list(model.classifier)
    for i, (a, b) in zip([i for i, l in enumerate(layers) if isinstance(l, nn.Linear)], dims):
        layers[i] = nn.Linear(a, b)
    model.classifier = nn.Sequential(*layers)


x0, x1 = nchw(inp["lpips_x0"]), nchw(inp["lpips_x1"])
for net, ctor in (("vgg", torchvision.models.vgg16), ("alex", torchvision.models.alexnet)):
    with torch.device("meta"):          # no time spent initialising the 100M-parameter ImageNet head
        backbone = ctor(weights=None)
    small_classifier(backbone, [(8, 4), (4, 4), (4, 10)])
    randomize(backbone.to_empty(device="cpu"))
    files[net + "_backbone"] = os.path.join(work, net + "_backbone.pth")
    torch.save(backbone.state_dict(), files[net + "_backbone"])
    # lpips builds its trunk from torchvision.models.<ctor>(...).features: hand it this backbone.
    lpips.pretrained_networks.tv = types.SimpleNamespace(**{ctor.__name__: lambda *a, _m=backbone, **k: _m})
    # 1. random linear layers, written as lpips' own state dict holds them (lin{k} and the lins.{k} twins)
    m = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    with torch.no_grad():
        for lin in m.lins:
            lin.model[1].weight.uniform_(0, 1)
    files[net + "_lin"] = os.path.join(work, net + "_lin.pth")
    torch.save({k: v for k, v in m.state_dict().items() if k.startswith("lin")}, files[net + "_lin"])
    ref = lpips.LPIPS(net=net, pretrained=True, model_path=files[net + "_lin"], pnet_rand=True, verbose=False)
    for a, b in zip(ref.lins, m.lins):
        assert torch.equal(a.model[1].weight, b.model[1].weight)
    with torch.no_grad():
        out["lpips_" + net] = ref(x0, x1, normalize=True).flatten().numpy()
    # 2. the linear weights shipped in the lpips package (the real v0.1 file)
    files[net + "_lin_shipped"] = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", net + ".pth")
    ref = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    with torch.no_grad():
        out["lpips_shipped_" + net] = ref(x0, x1, normalize=True).flatten().numpy()

# Inception, torchvision blocks: torchvision's inception_v3 (with its aux head), through pytorch-fid's wrapper.
tvi = randomize(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False))
files["inception_tv"] = os.path.join(work, "inception_tv.pth")
torch.save(tvi.state_dict(), files["inception_tv"])
make_tv = pi._inception_v3
pi._inception_v3 = lambda *a, **k: tvi
ref = pi.InceptionV3([3], resize_input=False, use_fid_inception=False).eval()
with torch.no_grad():
    out["inception_tv"] = ref(nchw(inp["inception_tv_x"]))[0].flatten(1).numpy()
pi._inception_v3 = make_tv

# Inception, FID blocks: the model fid_inception_v3() builds (same construction), random, saved; then
# pytorch-fid's own fid_inception_v3() loads that file strictly in place of the download.
inc = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
inc.Mixed_5b = pi.FIDInceptionA(192, pool_features=32)
inc.Mixed_5c = pi.FIDInceptionA(256, pool_features=64)
inc.Mixed_5d = pi.FIDInceptionA(288, pool_features=64)
inc.Mixed_6b = pi.FIDInceptionC(768, channels_7x7=128)
inc.Mixed_6c = pi.FIDInceptionC(768, channels_7x7=160)
inc.Mixed_6d = pi.FIDInceptionC(768, channels_7x7=160)
inc.Mixed_6e = pi.FIDInceptionC(768, channels_7x7=192)
inc.Mixed_7b = pi.FIDInceptionE_1(1280)
inc.Mixed_7c = pi.FIDInceptionE_2(2048)
randomize(inc)
files["inception_fid"] = os.path.join(work, "pt_inception.pth")
torch.save(inc.state_dict(), files["inception_fid"])
pi.load_state_dict_from_url = lambda *a, **k: torch.load(files["inception_fid"], map_location="cpu")
ref = pi.InceptionV3([3]).eval()      # pytorch-fid's defaults: resize to 299, normalize to [-1, 1]
with torch.no_grad():
    out["inception_fid"] = ref(nchw(inp["inception_fid_x"]))[0].flatten(1).numpy()

# Frechet distance: pytorch-fid's statistics (np.mean, np.cov) and calculate_frechet_distance.
for name in ("full", "lowrank"):
    a, b = inp["feats1_" + name], inp["feats2_" + name]
    s = [(np.mean(f, axis=0), np.cov(f, rowvar=False)) for f in (a, b)]
    out["frechet_" + name] = np.float64(fid_score.calculate_frechet_distance(*s[0], *s[1]))

files = {k: os.path.relpath(v, work) if v.startswith(work) else v for k, v in files.items()}
with open(os.path.join(work, "files.json"), "w") as f:
    json.dump(dict(files, versions=dict(torchvision=torchvision.__version__)), f)
np.savez(os.path.join(work, "outputs.npz"), **out)
'''


def reference_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    x0, x1 = noisy_pair((2, 64, 64, 3), seed=5, noise=0.2)
    return {
        "lpips_x0": x0.astype(np.float32), "lpips_x1": x1.astype(np.float32),
        "inception_tv_x": rng.random((2, 75, 75, 3), np.float32),          # smallest input, no resize
        "inception_fid_x": rng.random((1, 320, 256, 3), np.float32),       # resized: down in H, up in W
        "feats1_full": rng.standard_normal((400, 32)), "feats2_full": 0.5 + 1.3 * rng.standard_normal((400, 32)),
        "feats1_lowrank": rng.standard_normal((20, 32)), "feats2_lowrank": rng.standard_normal((20, 32)) ** 2,
    }


def run_reference(site: Path, work: Path, inputs: dict) -> None:
    work.mkdir(parents=True)
    np.savez(work / "inputs.npz", **inputs)
    proc = subprocess.run([sys.executable, "-c", REFERENCE, str(site), str(work)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, f"reference subprocess failed:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The reference outputs and weight files. They are a pure function of the script, the inputs, the
    reference packages and torch, so they are cached under that hash (the newest entry only)."""
    torch = pytest.importorskip("torch", reason="the LPIPS/FID references run on torch")
    site = reference_site()
    inputs = reference_inputs()
    h = hashlib.sha256("\n".join([REFERENCE, str(site), torch.__version__, *sorted(os.listdir(site))]).encode())
    for k in sorted(inputs):
        h.update(k.encode() + inputs[k].tobytes())
    outputs = cache_root() / "metrics-ref-outputs"
    work = outputs / h.hexdigest()[:20]
    if not (work / "outputs.npz").is_file():
        tmp = outputs / f".{work.name}.{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            run_reference(site, tmp, inputs)
            for old in outputs.iterdir():
                if old != tmp and not old.name.startswith("."):
                    shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, work)
        except OSError:        # cache not writable, or another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
            if not (work / "outputs.npz").is_file():
                work = tmp_path_factory.mktemp("metrics_ref") / "ref"
                run_reference(site, work, inputs)
    files = {k: v if k == "versions" or os.path.isabs(v) else str(work / v)
             for k, v in json.loads((work / "files.json").read_text()).items()}
    return dict(inputs=inputs, out=dict(np.load(work / "outputs.npz")), files=files, work=work)


@pytest.fixture(scope="module")
def inception_fid(ref):
    return load_inception(ref["files"]["inception_fid"])               # 1008 classes -> "fid"


@pytest.fixture(scope="module")
def inception_tv(ref):
    return load_inception(ref["files"]["inception_tv"])                # 1000 classes, aux head -> "torchvision"


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ----------------------------------------------------------------------------------------------
# LPIPS.

@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_matches_lpips_package(ref, net):
    x0, x1 = ref["inputs"]["lpips_x0"], ref["inputs"]["lpips_x1"]
    model = load_lpips(ref["files"][net + "_backbone"], ref["files"][net + "_lin"], net)
    got = lpips_distance(model, x0, x1)
    want = ref["out"]["lpips_" + net]
    assert got.shape == (2,) and np.all(want > 0)
    assert max_abs(got, want) <= 1e-5 * max(1.0, np.abs(want).max()), (got, want)
    # the real v0.1 linear weights shipped with lpips (lin{k} keys only)
    model = load_lpips(ref["files"][net + "_backbone"], ref["files"][net + "_lin_shipped"], net)
    want = ref["out"]["lpips_shipped_" + net]
    assert max_abs(lpips_distance(model, x0, x1), want) <= 1e-5 * max(1.0, np.abs(want).max())
    assert np.abs(lpips_distance(model, x0, x0)).max() <= 1e-12


def test_lpips_loader_is_strict(ref, tmp_path):
    backbone, lin = ref["files"]["vgg_backbone"], ref["files"]["vgg_lin"]
    sd = load_torch_file(backbone)

    def write(d, name):
        save_torch_file(d, tmp_path / name)
        return tmp_path / name

    missing = write({k: v for k, v in sd.items() if k != "features.10.bias"}, "missing.pth")
    with pytest.raises(ConversionError, match=r"missing key.*features\.10\.bias"):
        load_lpips(missing, lin, "vgg")
    extra = write({**sd, "features.99.weight": np.zeros(3, np.float32)}, "extra.pth")
    with pytest.raises(ConversionError, match=r"unexpected key.*features\.99\.weight"):
        load_lpips(extra, lin, "vgg")
    with pytest.raises(ConversionError, match=r"shape mismatch.*features\.0\.weight"):
        load_lpips(ref["files"]["alex_backbone"], lin, "vgg")      # AlexNet file for a VGG model
    lin_sd = load_torch_file(lin)
    bad_twin = write({**lin_sd, "lins.2.model.1.weight": lin_sd["lins.2.model.1.weight"] + 1}, "twin.pth")
    with pytest.raises(ConversionError, match=r"lins\.2\.model\.1\.weight differs"):
        load_lpips(backbone, bad_twin, "vgg")
    with pytest.raises(ValueError, match="at least 16x16"):
        load_lpips(backbone, lin, "vgg")(np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 8, 8, 3), np.float32))


# ----------------------------------------------------------------------------------------------
# Inception features and the Fréchet distance.

def test_inception_fid_variant_matches_pytorch_fid(ref, inception_fid):
    model = inception_fid
    assert model.variant == "fid"
    got = inception_features(model, ref["inputs"]["inception_fid_x"], batch_size=1)
    want = ref["out"]["inception_fid"]
    assert got.shape == want.shape == (1, 2048)
    assert max_abs(got, want) <= 1e-4 * np.abs(want).max(), (max_abs(got, want), np.abs(want).max())


def test_inception_torchvision_variant_matches_torchvision(ref, inception_tv):
    model = inception_tv
    assert model.variant == "torchvision"
    got = inception_features(model, ref["inputs"]["inception_tv_x"], resize_input=False, batch_size=2)
    want = ref["out"]["inception_tv"]
    assert max_abs(got, want) <= 1e-4 * np.abs(want).max(), (max_abs(got, want), np.abs(want).max())


def test_inception_loader_is_strict(ref, inception_tv, tmp_path):
    sd = load_torch_file(ref["files"]["inception_fid"])
    path = tmp_path / "no_fc.pth"
    save_torch_file({k: v for k, v in sd.items() if not k.startswith("fc.")}, path)
    with pytest.raises(ConversionError, match="cannot tell the Inception variant"):
        load_inception(path)
    assert load_inception(path, "fid").variant == "fid"
    with pytest.raises(ConversionError, match="variant='torchvision' but fc.weight .* is the 'fid' Inception's"):
        load_inception(ref["files"]["inception_fid"], "torchvision")
    save_torch_file({k: v for k, v in sd.items() if k != "Mixed_6b.branch7x7_2.bn.running_var"}, path)
    with pytest.raises(ConversionError, match=r"missing key.*Mixed_6b\.branch7x7_2\.bn\.running_var"):
        load_inception(path)
    save_torch_file({**sd, "Mixed_5b.branch9.conv.weight": np.zeros((1, 1, 1, 1), np.float32)}, path)
    with pytest.raises(ConversionError, match=r"unexpected key.*Mixed_5b\.branch9\.conv\.weight"):
        load_inception(path)
    with pytest.raises(ValueError, match="at least 75x75"):
        inception_tv(np.zeros((1, 74, 80, 3), np.float32), resize_input=False)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance(ref):
    inp = ref["inputs"]
    for name in ("full", "lowrank"):
        got = fid_from_features(inp["feats1_" + name], inp["feats2_" + name])
        assert abs(got - ref["out"]["frechet_" + name]) <= 1e-6 * abs(ref["out"]["frechet_" + name]), name


def test_frechet_distance_formula():
    """Independent of pytorch-fid: Tr sqrt(S1 S2) as the sum of the square roots of the eigenvalues of
    S1^1/2 S2 S1^1/2 (symmetric, so eigh), on full-rank covariances."""
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((500, 24)), rng.standard_normal((500, 24)) @ rng.standard_normal((24, 24)) + 0.3
    (mu1, s1), (mu2, s2) = activation_statistics(a), activation_statistics(b)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="N >= 2"):
        activation_statistics(a[:1])
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, s1, mu2, s2[:3, :3])


# ----------------------------------------------------------------------------------------------
# evaluate_pairs.

def test_evaluate_pairs(ref, inception_fid, monkeypatch):
    """All metrics over 2 pairs of 320x256 images, against the individual functions (the shapes and batch
    size of the Inception parity test, so its compiled program is reused). The Fréchet distance itself is
    tested above; here it is intercepted (scipy's sqrtm of a 2048x2048 matrix takes ~15 s on 2 cores)."""
    import imagpose_jax.metrics.evaluate as evaluate
    seen = []
    monkeypatch.setattr(evaluate, "fid_from_features", lambda a, b: seen.append((a, b)) or 12.5)
    gen, tgt = noisy_pair((2, 320, 256, 3), seed=11, noise=0.15)
    gen, tgt = gen.astype(np.float32), tgt.astype(np.float32)
    lp = load_lpips(ref["files"]["alex_backbone"], ref["files"]["alex_lin_shipped"], "alex")
    inc = inception_fid
    res = evaluate_pairs(list(gen), tgt, lpips=lp, fid=inc, batch_size=1)
    assert res["n"] == 2 and res["fid"] == 12.5
    assert res["ssim"] == pytest.approx(float(np.mean(ssim(gen, tgt))), abs=1e-6)
    assert res["psnr"] == pytest.approx(float(np.mean(psnr(gen, tgt))), abs=1e-5)
    assert res["l1"] == pytest.approx(float(np.mean(l1(gen, tgt))), abs=1e-7)
    per_pair = [float(lp(gen[i], tgt[i])) for i in range(2)]  # the module itself, unjitted, one pair at a time
    assert res["lpips"] == pytest.approx(float(np.mean(per_pair)), abs=1e-5)
    (fa, fb), = seen
    feats = inception_features(inc, np.concatenate([gen, tgt]), batch_size=1)
    assert max_abs(fa, feats[:2]) == 0 and max_abs(fb, feats[2:]) == 0
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate_pairs(gen, tgt[:1])
    with pytest.raises(ValueError, match="at least 2 images"):
        evaluate_pairs(gen[:1], tgt[:1], fid=inc)


def test_batched_pads_the_last_batch():
    from imagpose_jax.metrics.batching import batched
    shapes = []
    out = batched(lambda a, b: shapes.append(a.shape) or a.sum(axis=1) + b[:, 0], (np.arange(10.).reshape(5, 2),
                  np.ones((5, 1))), batch_size=2)
    assert shapes == [(2, 2)] * 3 and out.tolist() == [2, 6, 10, 14, 18]
    assert batched(lambda a: a * 2, (np.ones((1, 3)),), batch_size=4).tolist() == [[2.0] * 3]  # one short batch: as is
