"""`imagpose test` (sampling/test_set.py): every pair of the DeepFashion-format fixture generated with tiny random
weights, named and sized for the peers' metric scripts, then `imagpose evaluate`'s table; an interrupted run resumes
without redoing finished pairs and writes what an uninterrupted one writes; the original's JSON index."""
import os

import numpy as np
import pytest
from PIL import Image

from imagpose_jax.cli import main as cli_main
from imagpose_jax.data.index import DataFormatError, read_deepfashion_pairs, read_imagpose_json
from imagpose_jax.data.synthetic import make_deepfashion_dataset, make_synthetic_dataset
from imagpose_jax.metrics import pair_metrics
from imagpose_jax.sampling.test_set import PARTIAL, generate_test_set, output_name, read_test_pairs

# test_sampler.py's program (2 grids of 64x64 views, 2 steps): in one session the compiled sampler is reused
VIEW, STEPS, BATCH = (64, 64), 2, 2
SAMPLING = ["--view-size", "64x64", "--steps", str(STEPS), "--batch-size", str(BATCH)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("test_set")
    files = make_deepfashion_dataset(root / "deepfashion", num_persons=2, poses_per_person=3, seed=2, test_fraction=0.5)
    return root, files["test"], tiny_weights


@pytest.fixture(scope="module")
def cli_run(data):
    """`imagpose test` on the fixture's 6 test pairs (one person's 3 views), uninterrupted."""
    root, test, weights = data
    out = root / "cli"
    assert cli_main(["test", "--weights", weights, "--pairs", test.pairs_csv, "--annotations", test.annotations_csv,
                     "--images", test.image_dir, "--out", str(out), *SAMPLING]) == 0
    return out


@pytest.fixture(scope="module")
def pipe(data):
    from imagpose_jax.sampling.pipeline import IMAGPosePipeline
    from imagpose_jax.sampling.sampler import SamplerConfig
    return IMAGPosePipeline.from_pretrained(data[2], SamplerConfig(num_inference_steps=STEPS))


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_every_pair_named_and_sized_then_evaluated(data, cli_run, capsys):
    root, test, _ = data
    pairs = read_deepfashion_pairs(test.pairs_csv)
    assert len(pairs) == 6
    names = sorted(os.listdir(cli_run))
    assert names == sorted(f"{a[:-4]}_2_{b[:-4]}_vis.png" for a, b in pairs)   # PIDM's names, nothing else left
    for name in names:
        with Image.open(cli_run / name) as im:
            assert (im.format, im.size, im.mode) == ("PNG", (176, 256), "RGB")
    images = np.stack([_pixels(cli_run / n) for n in names])
    assert images.std() > 10 and len({im.tobytes() for im in images}) == 6   # 6 different results

    assert cli_main(["evaluate", "--generated", str(cli_run), "--targets", test.image_dir, "--out",
                     str(root / "eval"), "--batch-size", "4"]) == 0
    table = capsys.readouterr().out
    assert "| Method | SSIM ↑ | LPIPS ↓ | FID ↓ | PSNR ↑ | L1 ↓ |" in table
    import json
    m = json.loads((root / "eval" / "metrics.json").read_text())
    assert m["n"] == 6 and m["image_size"] == [256, 176]
    # each generated image was scored against its pair's target, with the values of pair_metrics
    assert [p["target"] for p in m["pairs"]] == [n.split("_2_")[-1].split("_vis")[0] + ".jpg" for n in names]
    gen = images.astype(np.float32) / 255
    tgt = np.stack([_pixels(os.path.join(test.image_dir, p["target"])) for p in m["pairs"]]).astype(np.float32) / 255
    want = pair_metrics(gen, tgt, batch_size=4)
    for k in ("ssim", "psnr", "l1"):
        np.testing.assert_allclose([p[k] for p in m["pairs"]], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert f"| imagpose-jax | {m['ssim']:.4f} | – | – | {m['psnr']:.2f} | {m['l1']:.4f} |" in \
        (root / "eval" / "metrics.md").read_text(encoding="utf-8")


def test_interrupted_run_resumes_without_redoing_pairs(data, cli_run, pipe, tmp_path):
    _, test, _ = data
    pairs = read_test_pairs(pairs_csv=test.pairs_csv, annotations_csv=test.annotations_csv, image_dir=test.image_dir)
    out = tmp_path / "gen"

    def stop(written):
        raise KeyboardInterrupt   # as a Ctrl-C after the first batch

    with pytest.raises(KeyboardInterrupt):
        generate_test_set(pipe, pairs, out, view_size=VIEW, batch_size=BATCH, progress=False, on_batch=stop)
    first = sorted(os.listdir(out))
    assert first == sorted(p.name for p in pairs[:BATCH])
    stats = {n: os.stat(out / n) for n in first}
    # a half-written image of a killed run lies under a temporary name: not counted as done, and removed
    nxt = pairs[BATCH].name
    (out / PARTIAL.format(name=nxt, pid=99999)).write_bytes(b"\x89PNG half")

    seen = []
    done = generate_test_set(pipe, pairs, out, view_size=VIEW, batch_size=BATCH, progress=False, on_batch=seen.append)
    assert done == {"pairs": 6, "generated": 4, "skipped": 2, "out_dir": str(out)}
    assert [os.path.basename(p) for batch in seen for p in batch] == [p.name for p in pairs[BATCH:]]
    for n, st in stats.items():   # the finished pairs were not rewritten
        after = os.stat(out / n)
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size), n
    assert sorted(os.listdir(out)) == sorted(os.listdir(cli_run))   # the partial file is gone
    for n in os.listdir(out):   # what the uninterrupted run wrote: a pair's noise is its own
        np.testing.assert_array_equal(_pixels(out / n), _pixels(cli_run / n), err_msg=n)
    assert generate_test_set(pipe, pairs, out, view_size=VIEW, batch_size=BATCH, progress=False)["generated"] == 0


def test_original_json_index_and_pcdms_names(tmp_path, pipe):
    """The original's index (pose renderings): each person's first view to its other views, PCDMs' names at the
    images' own 128x128, evaluated against the index's image folder (sources included)."""
    from imagpose_jax.metrics.folders import evaluate_folders
    test = make_synthetic_dataset(tmp_path / "synth", num_persons=2, poses_per_person=3, seed=1,
                                  test_fraction=0.5)["test"]
    pairs = read_test_pairs(index_json=test.index_json, naming="pcdms")
    (person,) = read_imagpose_json(test.index_json)
    stems = [os.path.basename(v.image)[:-4] for v in person.views]
    assert [p.name for p in pairs] == [f"{stems[0]}_to_{stems[1]}.png", f"{stems[0]}_to_{stems[2]}.png"]
    assert all(p.source.pose_image.endswith(os.path.join("dwpose", os.path.basename(p.source.image))) for p in pairs)
    done = generate_test_set(pipe, pairs, tmp_path / "gen", view_size=VIEW, size=(128, 128), batch_size=BATCH,
                             progress=False)
    assert done["generated"] == 2
    res = evaluate_folders(tmp_path / "gen", test.image_dir, progress=False)
    assert res["n"] == 2 and res["image_size"] == [128, 128]
    assert [p["target"] for p in res["pairs"]] == [os.path.basename(p.target.image) for p in pairs]


def test_errors_name_the_file_and_the_pair(data, tmp_path, capsys):
    root, test, weights = data
    bad = tmp_path / "pairs.csv"
    lines = open(test.pairs_csv).read().splitlines()
    a = lines[2].split(",")[0]
    bad.write_text("\n".join(lines[:3] + [f"{a},fashionMENnobody_1front.jpg"]) + "\n")
    with pytest.raises(DataFormatError, match=r"pairs\.csv.?: pair 3 .* names 'fashionMENnobody_1front\.jpg', which is "
                                              r"not in .*fasion-resize-annotation-test\.csv"):
        read_test_pairs(pairs_csv=bad, annotations_csv=test.annotations_csv, image_dir=test.image_dir)
    argv = ["test", "--weights", weights, "--annotations", test.annotations_csv, "--images", test.image_dir,
            "--out", str(tmp_path / "o")]
    assert cli_main(argv + ["--pairs", str(bad)]) == 2   # one line naming it, before any weights are loaded
    err = capsys.readouterr().err
    assert err.startswith("imagpose test: error: ") and "fashionMENnobody_1front.jpg" in err and err.count("\n") == 1
    with pytest.raises(SystemExit, match="--images DIR"):
        cli_main(["test", "--weights", weights, "--annotations", test.annotations_csv, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--index JSON"):
        cli_main(["test", "--weights", weights, "--out", str(tmp_path / "o")])
    assert output_name("dir/a.jpg", "b.png", "pidm") == "a_2_b_vis.png"
    with pytest.raises(ValueError, match="naming must be one of"):
        output_name("a", "b", "gfla")
