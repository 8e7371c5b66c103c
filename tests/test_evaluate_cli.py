"""`imagpose evaluate` (metrics/folders.py) and the DeepFashion-format synthetic fixture (`make-dataset
--format deepfashion`): pairing by name, strict errors, reports, values equal to `evaluate_pairs`."""
import json
import os
import re

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from convert_weights.core import save_torch_file, to_torch_layout, torch_key
from imagpose_jax.cli import main as cli_main
from imagpose_jax.data.index import read_deepfashion, read_deepfashion_pairs
from imagpose_jax.data.synthetic import make_deepfashion_dataset, make_synthetic_dataset
from imagpose_jax.metrics import evaluate_pairs, inception_features, load_inception, load_lpips, pair_metrics
from imagpose_jax.metrics.fid import BN_RENAMES, InceptionV3
from imagpose_jax.metrics.folders import EvaluationError, evaluate_folders, metrics_table
from imagpose_jax.metrics.lpips import LPIPS
from imagpose_jax.models.init import abstract

ARGS = dict(num_persons=4, poses_per_person=3, seed=2, test_fraction=0.5)
NAME = re.compile(r"^fashion(WOMEN|MEN)[A-Za-z_]+id\d{10}_\d+(front|side|back|full|additional)\.jpg$")
HEADER = "| Method | SSIM ↑ | LPIPS ↓ | FID ↓ | PSNR ↑ | L1 ↓ |"


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepfashion")
    return root, make_deepfashion_dataset(root, **ARGS)


def strict_json(path):
    def no_constants(name):
        raise AssertionError(f"{path}: non-standard JSON constant {name}")
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=no_constants)


def read_folder(folder, names):
    return np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB"), np.float32) / 255 for n in names])


def write_images(folder, names, images):
    """uint8-quantised PNGs of (N, H, W, 3) images in [0, 1], named as `names` with the extension .png."""
    os.makedirs(folder, exist_ok=True)
    for name, image in zip(names, images):
        Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(os.path.join(folder, os.path.splitext(name)[0] + ".png"))


def targets(fixture):
    root, files = fixture
    names = sorted(os.listdir(files["test"].image_dir))
    return files["test"].image_dir, names, read_folder(files["test"].image_dir, names)


def perturbed(images, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, 0.08, images.shape) + 0.05 * np.roll(images, 7, axis=2), 0, 1)


# ----------------------------------------------------------------------------------------------
# The DeepFashion-format fixture.

def test_fixture_files_and_formats(fixture):
    root, files = fixture
    assert sorted(os.listdir(root)) == ["fasion-resize-annotation-test.csv", "fasion-resize-annotation-train.csv",
                                        "fasion-resize-pairs-test.csv", "fasion-resize-pairs-train.csv", "test", "train"]
    for split in ("train", "test"):
        f = files[split]
        lines = open(f.annotations_csv).read().splitlines()
        assert lines[0] == "name:keypoints_y:keypoints_x" and len(lines) == 1 + 2 * 3
        assert all(re.fullmatch(r"[^:]+:\[-?\d+(, -?\d+){17}\]:\[-?\d+(, -?\d+){17}\]", row) for row in lines[1:])
        pairs = open(f.pairs_csv).read().splitlines()
        assert pairs[0] == "from,to" and len(pairs) == 1 + 2 * 3 * 2
        names = sorted(os.listdir(f.image_dir))
        assert len(names) == 6 and all(NAME.match(n) for n in names), names
        assert {row.split(":")[0] for row in lines[1:]} == set(names)
        for name in names:
            with Image.open(os.path.join(f.image_dir, name)) as im:
                assert (im.format, im.size, im.mode) == ("JPEG", (176, 256), "RGB")
        assert {n for pair in read_deepfashion_pairs(f.pairs_csv) for n in pair} == set(names)


def test_fixture_reads_back_with_read_deepfashion(fixture, tmp_path):
    """`read_deepfashion` reads the keypoints back; they are the synthetic dataset's for the same arguments,
    with some missing (-1)."""
    _, files = fixture
    reference = make_synthetic_dataset(tmp_path, height=256, width=176, **ARGS)
    missing = 0
    for split in ("train", "test"):
        persons = read_deepfashion(files[split].annotations_csv, files[split].image_dir)
        same = read_deepfashion(reference[split].annotations_csv, reference[split].image_dir)
        assert len(persons) == 2 and [len(p.views) for p in persons] == [3, 3]
        assert all(p.name == os.path.basename(v.image).rsplit("_", 1)[0] for p in persons for v in p.views)
        for p, q in zip(persons, same):
            for v, w in zip(p.views, q.views):
                np.testing.assert_array_equal(v.keypoints, w.keypoints)
                assert v.keypoints.shape == (18, 2) and (v.keypoints[:, 0] < 176).all() and (v.keypoints[:, 1] < 256).all()
                missing += int((v.keypoints == -1).all(-1).sum())
    assert missing > 0


def test_make_dataset_cli_deepfashion(tmp_path, capsys):
    assert cli_main(["make-dataset", str(tmp_path), "--format", "deepfashion", "--num-persons", "2",
                     "--poses-per-person", "2", "--test-fraction", "0.5"]) == 0
    assert "fasion-resize-annotation-test.csv" in capsys.readouterr().out
    (person,) = read_deepfashion(tmp_path / "fasion-resize-annotation-test.csv", tmp_path / "test")
    assert len(person.views) == 2 and Image.open(person.views[0].image).size == (176, 256)


# ----------------------------------------------------------------------------------------------
# Evaluation.

def test_identical_folders(fixture, tmp_path, capsys):
    """Generated == targets (as PNGs of the decoded JPEGs): SSIM 1, L1 0, PSNR +inf (null in the JSON, ∞ in the
    table); LPIPS and FID not computed: '–'. Through `imagpose evaluate`, last batch padded."""
    tdir, names, images = targets(fixture)
    write_images(tmp_path / "gen", names, images)
    assert cli_main(["evaluate", "--generated", str(tmp_path / "gen"), "--targets", tdir, "--out",
                     str(tmp_path / "out"), "--batch-size", "4"]) == 0
    assert HEADER in capsys.readouterr().out
    m = strict_json(tmp_path / "out" / "metrics.json")
    assert m["n"] == 6 and m["image_size"] == [256, 176]
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6) and m["l1"] == 0.0 and m["psnr"] is None
    assert m["lpips"] is None and m["fid"] is None and m["fid_reference"] is None
    assert [p["target"] for p in m["pairs"]] == names
    assert [p["generated"] for p in m["pairs"]] == [n.replace(".jpg", ".png") for n in names]
    assert all(p["psnr"] is None and p["l1"] == 0.0 and set(p) == {"name", "generated", "target", "ssim", "psnr", "l1"}
               for p in m["pairs"])
    md = (tmp_path / "out" / "metrics.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    i = lines.index(HEADER)
    assert lines[i + 1] == "|:--|--:|--:|--:|--:|--:|"
    assert lines[i + 2] == "| imagpose-jax | 1.0000 | – | – | ∞ | 0.0000 |"
    assert "6 pairs of 256×176 images" in md and "FID: not computed" in md


def test_perturbed_set_equals_evaluate_pairs(fixture, tmp_path):
    """Per-pair values and means equal `pair_metrics` / `evaluate_pairs` on the same arrays."""
    tdir, names, images = targets(fixture)
    write_images(tmp_path / "gen", names, perturbed(images))
    gen = read_folder(tmp_path / "gen", [n.replace(".jpg", ".png") for n in names])
    res = evaluate_folders(tmp_path / "gen", tdir, batch_size=4, progress=False)
    ref, per = evaluate_pairs(gen, images, batch_size=4), pair_metrics(gen, images, batch_size=4)
    for k in ("ssim", "psnr", "l1"):
        assert res[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k
        np.testing.assert_allclose([p[k] for p in res["pairs"]], per[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert 0.2 < res["ssim"] < 0.95 and 10 < res["psnr"] < 40 and res["n"] == 6
    out = tmp_path / "out"
    from imagpose_jax.metrics.folders import write_reports
    write_reports(res, out, method="ours")
    assert strict_json(out / "metrics.json")["psnr"] == pytest.approx(res["psnr"])
    assert f"| ours | {res['ssim']:.4f} | – | – | {res['psnr']:.2f} | {res['l1']:.4f} |" in metrics_table(res, "ours")


def random_torch_file(module, path, select=lambda p: True, strip=0, renames=(), extra=None, seed=0, positive=False):
    """A PyTorch-layout weight file of random weights for the abstract `module`'s state (the paths `select`
    picks, the first `strip` path parts dropped): He-normal kernels (`positive`: their absolute values),
    BatchNorm at identity."""
    rng = np.random.default_rng(seed)
    sd = dict(extra or {})
    for path_, var in nnx.to_flat_state(nnx.state(module)):
        if not select(path_):
            continue
        leaf = str(path_[-1])
        shape = to_torch_layout(leaf, np.empty(var.shape, np.float32)).shape
        if leaf == "kernel":
            a = rng.normal(0, (2.0 / np.prod(shape[1:])) ** 0.5, shape)
            a = np.abs(a) if positive else a
        elif leaf in ("scale", "var"):
            a = np.ones(shape)
        else:
            a = rng.normal(0, 0.05, shape) if leaf == "bias" else np.zeros(shape)
        sd[torch_key(path_[strip:], renames)] = a.astype(np.float32)
    save_torch_file(sd, path)
    return str(path)


def test_lpips_and_fid_weights(fixture, tmp_path, monkeypatch):
    """With (random) LPIPS and Inception weight files through the command line: per-pair LPIPS equals
    `pair_metrics` with the same module; FID is taken between the generated features and those of --fid-real's
    images (the Fréchet distance itself is intercepted: sqrtm of a 2048x2048 matrix takes ~15 s on 2 cores)."""
    import imagpose_jax.metrics.folders as folders
    seen = []
    monkeypatch.setattr(folders, "fid_from_features", lambda a, b: seen.append((a, b)) or 12.5)
    lp_model = abstract(lambda k: LPIPS("alex", rngs=k))
    backbone = random_torch_file(lp_model, tmp_path / "alex.safetensors", lambda p: p[0] == "net", strip=1)
    linear = random_torch_file(lp_model, tmp_path / "lin.safetensors", lambda p: str(p[0]).startswith("lin"),
                               seed=1, positive=True)
    inception = random_torch_file(abstract(lambda k: InceptionV3("fid", rngs=k)), tmp_path / "inc.safetensors",
                                  renames=BN_RENAMES, extra={"fc.weight": np.zeros((1008, 1), np.float32)})
    tdir, names, images = targets(fixture)
    write_images(tmp_path / "gen", names, perturbed(images, seed=1))
    real_dir = fixture[1]["train"].image_dir
    assert cli_main(["evaluate", "--generated", str(tmp_path / "gen"), "--targets", tdir, "--out", str(tmp_path / "out"),
                     "--lpips", backbone, linear, "--inception", inception, "--fid-real", real_dir,
                     "--batch-size", "4"]) == 0
    m = strict_json(tmp_path / "out" / "metrics.json")
    gen = read_folder(tmp_path / "gen", [n.replace(".jpg", ".png") for n in names])
    lp = load_lpips(backbone, linear, "alex")
    np.testing.assert_allclose([p["lpips"] for p in m["pairs"]], pair_metrics(gen, images, lp, batch_size=4)["lpips"],
                               rtol=1e-5, atol=1e-6)
    assert m["lpips_net"] == "alex" and m["lpips"] > 0 and m["fid"] == 12.5
    assert m["fid_reference"] == {"set": "fid_real", "dir": os.path.abspath(real_dir), "n": 6, "inception_variant": "fid"}
    real = read_folder(real_dir, sorted(os.listdir(real_dir)))
    feats = inception_features(load_inception(inception), np.concatenate([gen, real[:2]]), batch_size=4)
    (fg, fr), = seen
    assert fg.shape == fr.shape == (6, 2048)
    np.testing.assert_allclose(fg, feats[:6], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fr[:2], feats[6:], rtol=1e-5, atol=1e-5)
    md = (tmp_path / "out" / "metrics.md").read_text(encoding="utf-8")
    assert f"| {m['ssim']:.4f} | {m['lpips']:.4f} | 12.50 |" in md and "against 6 real images" in md


# ----------------------------------------------------------------------------------------------
# Errors name the files.

def blank(folder, names, size=(176, 256)):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        Image.new("RGB", size, (200, 200, 200)).save(os.path.join(folder, name))


def test_unmatched_images_are_named(tmp_path):
    blank(tmp_path / "t", [f"t{i}.jpg" for i in range(3)] + [f"only_t{i}.jpg" for i in range(7)])
    blank(tmp_path / "g", [f"t{i}.png" for i in range(3)] + ["only_g.png"])
    with pytest.raises(EvaluationError) as info:
        evaluate_folders(tmp_path / "g", tmp_path / "t", progress=False)
    msg = str(info.value)
    assert "1 generated image(s) have no target" in msg and "only_g.png" in msg
    assert "7 target(s) have no generated image" in msg and "only_t0.jpg, only_t1.jpg" in msg and "..." in msg
    assert "only_t6.jpg" not in msg  # a few names, then the count
    with pytest.raises(SystemExit, match="only_g.png"):  # the command line: an error message, no traceback
        cli_main(["evaluate", "--generated", str(tmp_path / "g"), "--targets", str(tmp_path / "t"), "--out",
                  str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_size_mismatch_is_named(tmp_path):
    blank(tmp_path / "t", ["a.jpg", "b.jpg", "c.jpg"])
    blank(tmp_path / "g", ["a.png", "c.png"])
    blank(tmp_path / "g", ["b.png"], size=(352, 512))
    with pytest.raises(EvaluationError, match=r"1 pair\(s\) .* differ in size .*b\.png 512x352 vs b\.jpg 256x176"):
        evaluate_folders(tmp_path / "g", tmp_path / "t", progress=False)
    blank(tmp_path / "t", ["b.jpg"], size=(352, 512))  # both of b now 512x352: pairs of two sizes
    with pytest.raises(EvaluationError, match=r"256x176: 2 \(e\.g\. a\.jpg\); 512x352: 1 \(e\.g\. b\.jpg\)"):
        evaluate_folders(tmp_path / "g", tmp_path / "t", progress=False)


def test_other_folder_errors(tmp_path):
    blank(tmp_path / "t", ["a.jpg", "b.jpg"])
    blank(tmp_path / "g", ["a.png", "a.jpg", "b.png"])
    (tmp_path / "g" / "notes.txt").write_text("ignored")
    with pytest.raises(EvaluationError, match=r"1 name\(s\) with two images .*a\.jpg and a\.png"):
        evaluate_folders(tmp_path / "g", tmp_path / "t", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="holds no images"):
        evaluate_folders(tmp_path / "empty", tmp_path / "t", progress=False)
    with pytest.raises(FileNotFoundError, match="nothere"):
        evaluate_folders(tmp_path / "nothere", tmp_path / "t", progress=False)
    with pytest.raises(ValueError, match="needs an Inception model"):
        evaluate_folders(tmp_path / "g", tmp_path / "t", fid_real_dir=tmp_path / "t", progress=False)


def test_pair_names_find_their_targets(tmp_path):
    """`imagpose test`'s names (PIDM's FROM_2_TO_vis, PCDMs' FROM_to_TO) pair with TO; targets no generated image
    names (the test folder's sources) are not an error then, a pair name whose target is missing is."""
    from imagpose_jax.metrics.folders import match_pairs
    blank(tmp_path / "t", ["a.jpg", "b.jpg", "c.jpg", "unused.jpg"])
    blank(tmp_path / "g", ["a_2_b_vis.png", "b_2_c_vis.png", "c_to_a.png"])
    got = [(n, os.path.basename(g), os.path.basename(t)) for n, g, t in match_pairs(tmp_path / "g", tmp_path / "t")]
    assert got == [("a_2_b_vis", "a_2_b_vis.png", "b.jpg"), ("b_2_c_vis", "b_2_c_vis.png", "c.jpg"),
                   ("c_to_a", "c_to_a.png", "a.jpg")]
    blank(tmp_path / "g", ["a_2_nobody_vis.png"])
    with pytest.raises(EvaluationError, match=r"^1 generated image\(s\) have no target .*: a_2_nobody_vis\.png$"):
        match_pairs(tmp_path / "g", tmp_path / "t")
