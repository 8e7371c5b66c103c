"""Nothing lost, nothing silently wrong (issue 15): whole-folder conversions (a conversion killed half-way leaves
the old folder), a damaged newest training checkpoint (resume falls back to the newest readable one), a failed
checkpoint save (one clear error, no temporary folder left), images of every PIL mode read as the right 8-bit RGB,
every training image checked to read before training (skipping gives up past a fraction), no NaN or inf written or
read as a parameter, one-line errors for damaged weight files and zero counts.
Each test says what the code before did."""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from cpu_env import cpu_env

from imagpose_jax.preprocess import BACKDROP, as_rgb_image, load_image, to_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- inference folders: whole, never a mix

def _pipeline_argv(src: str, out: str, *extra: str) -> list[str]:
    return ["pipeline", "--unet", f"{src}/denoising_unet-0.pth", "--pose-guider", f"{src}/pose_guider-0.pth",
            "--patch", f"{src}/patch-0.pth", "--vae", f"{src}/vae", "--image-encoder", f"{src}/image_encoder",
            "--config", f"{src}/config.json", "--out", out, *extra]


def _digest(folder: str) -> dict[str, str]:
    """Relative path -> sha1 of every file under `folder`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(random tiny source checkpoints, a converted inference folder of them, its digest)."""
    from convert_weights.cli import main
    from convert_weights.random_weights import write_random_checkpoints
    root = tmp_path_factory.mktemp("faults")
    src, out = str(root / "src"), str(root / "weights")
    write_random_checkpoints(src, "tiny", seed=0, init="normal")
    assert main(_pipeline_argv(src, out)) == 0
    return src, out, _digest(out)


def _old_folder(converted, tmp_path) -> str:
    out = str(tmp_path / "weights")
    shutil.copytree(converted[1], out)
    return out


def test_out_refused_unless_overwrite_and_replaced_whole(converted, tmp_path):
    # Before: a second conversion wrote into the existing folder without a word, and a stale part (here an old
    # denoiser_ema/ of another model) survived next to the new weights.
    from convert_weights.cli import main
    src, _, digest = converted
    out = _old_folder(converted, tmp_path)
    os.makedirs(os.path.join(out, "denoiser_ema"))
    with open(os.path.join(out, "denoiser_ema", "params.safetensors"), "wb") as f:
        f.write(b"stale")
    with pytest.raises(SystemExit, match=f"{out} exists and is not empty: pass --overwrite"):
        main(_pipeline_argv(src, out))
    assert os.path.isfile(os.path.join(out, "denoiser_ema", "params.safetensors"))
    assert main(_pipeline_argv(src, out, "--overwrite")) == 0
    assert sorted(os.listdir(out)) == ["denoiser", "image_encoder", "vae"]
    assert _digest(out) == digest
    assert sorted(os.listdir(tmp_path)) == ["weights"]  # no temporary or old folder left beside it


def test_conversion_failing_half_way_keeps_old_folder(converted, tmp_path, monkeypatch):
    # Before: the denoiser was already replaced when the VAE conversion failed: new denoiser/, old vae/ and
    # image_encoder/, a mix that loads without complaint.
    from convert_weights import cli
    src, _, digest = converted
    out = _old_folder(converted, tmp_path)

    def fail(args):  # the VAE conversion, after the denoiser was written
        assert os.path.isfile(os.path.join(os.path.dirname(args.out), "denoiser", "params.safetensors"))
        raise RuntimeError("simulated failure after the denoiser was written")
    monkeypatch.setattr(cli, "convert_vae", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(_pipeline_argv(src, out, "--overwrite"))
    assert _digest(out) == digest
    assert sorted(os.listdir(tmp_path)) == ["weights"]


def test_conversion_killed_half_way_keeps_old_folder(converted, tmp_path):
    # Before: `imagpose-convert pipeline` wrote straight into --out: killed after the denoiser, the folder held
    # the new denoiser with the old VAE and image encoder.
    from imagpose_jax.sampling.pipeline import load_pipeline_models
    src, _, digest = converted
    out = _old_folder(converted, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "convert_weights", *_pipeline_argv(src, out, "--overwrite")],
                            cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    written = f"{out}.tmp-{proc.pid}/denoiser/params.safetensors"
    deadline = time.monotonic() + 120
    while not os.path.isfile(written) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the conversion ended before the kill: {err.decode()[-2000:]}"
    assert _digest(out) == digest  # the old folder, untouched
    assert os.path.isfile(written) and not os.path.isdir(f"{out}.tmp-{proc.pid}/image_encoder")  # the half beside
    load_pipeline_models(out)


def test_atomic_folder_and_pipeline_folder_check(tmp_path):
    # Before: no such helpers (five places spelled the layout out; each writer wrote in place).
    from imagpose_jax.checkpoint.folder import PipelineFolder, atomic_folder
    target = str(tmp_path / "export")
    for round_ in range(2):  # a fresh target, then one replaced whole (a rerun's export)
        with atomic_folder(target, overwrite=True) as tmp:
            assert tmp == f"{target}.tmp-{os.getpid()}"
            os.makedirs(os.path.join(tmp, f"part{round_}"))
        assert os.listdir(target) == [f"part{round_}"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target, overwrite=True) as tmp:
            os.makedirs(os.path.join(tmp, "partial"))
            raise KeyboardInterrupt
    assert os.listdir(target) == ["part1"] and sorted(os.listdir(tmp_path)) == ["export"]
    with pytest.raises(FileNotFoundError, match=r"missing weights: .*export/denoiser .*imagpose-convert pipeline"):
        PipelineFolder(target).check()


# ---------------------------------------------------------------- training checkpoints

def _tiny_state(offset: float = 0.0):
    """A small nnx state with what a train state holds: float arrays (over orbax's 1 KiB inline limit, so they
    live in the data files), an int and a PRNG key."""
    import jax
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self):
            self.kernel = nnx.Param(np.arange(64 * 64, dtype=np.float32).reshape(64, 64) + offset)
            self.step = nnx.Variable(np.int32(offset))
            self.key = nnx.Variable(jax.random.key(int(offset)))
    state = nnx.state(Tiny())
    from imagpose_jax.sharding import make_mesh, state_shardings
    return state, state_shardings(state, make_mesh(devices=jax.devices()[:1]))


def _data_iterator():
    import grain
    return grain.MapDataset.range(100).to_iter_dataset().__iter__()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads
@pytest.mark.parametrize("damage", ["truncate", "zero-fill"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, caplog, damage):
    # Before: the loop restored `latest_step()` (2) and failed with tensorstore's "Encountered error while reading
    # array index" carrying whole TensorStore specs: hundreds of lines, and no way on but deleting step 2 by hand.
    from imagpose_jax.checkpoint.train_state import TrainCheckpointer, np_tree
    directory = str(tmp_path / "checkpoints")
    it = _data_iterator()
    ck = TrainCheckpointer(directory, keep=3)
    for step in (1, 2):
        next(it)
        ck.save(step, _tiny_state(step)[0], it)
    ck.close()
    data = max(glob.glob(f"{directory}/2/state/ocdbt.process_0/d/*"), key=os.path.getsize)
    if damage == "truncate":
        os.truncate(data, os.path.getsize(data) // 3)
    else:
        with open(data, "r+b") as f:
            f.write(b"\0" * os.path.getsize(data))

    like, shardings = _tiny_state(99)
    it = _data_iterator()
    ck = TrainCheckpointer(directory, keep=3)
    with caplog.at_level(logging.WARNING):
        step, state = ck.restore_latest(like, shardings, it)
    assert step == 1
    want = np_tree(_tiny_state(1)[0])
    got = np_tree(state)
    for key in ("kernel", "step", "key"):
        np.testing.assert_array_equal(got[key].get_value(), want[key].get_value(), err_msg=key)
    assert next(it) == 1  # the data position of step 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "step 2" in warnings[0].getMessage() and "2.corrupt" in warnings[0].getMessage()
    assert len(warnings[0].getMessage()) < 1000
    assert sorted(os.listdir(directory)) == ["1", "2.corrupt"] and ck.all_steps() == [1]
    assert ck.save(2, state, it)  # the resumed run saves step 2 again
    ck.close()
    assert TrainCheckpointer(directory).all_steps() == [1, 2]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_readable_checkpoint_is_one_error(tmp_path):
    # Before: orbax's own error for the newest step. Now one CheckpointError naming each step; nothing renamed
    # (e.g. a config change makes every checkpoint unreadable, and none of them is damaged).
    import jax
    from flax import nnx
    from imagpose_jax.checkpoint.train_state import CheckpointError, TrainCheckpointer
    directory = str(tmp_path / "checkpoints")
    ck = TrainCheckpointer(directory)
    ck.save(1, _tiny_state(1)[0])
    ck.close()
    other = nnx.state(nnx.Linear(3, 5, rngs=nnx.Rngs(0)))
    from imagpose_jax.sharding import make_mesh, state_shardings
    shardings = state_shardings(other, make_mesh(devices=jax.devices()[:1]))
    with pytest.raises(CheckpointError, match=f"no checkpoint in {directory} reads back: step 1: "):
        TrainCheckpointer(directory).restore_latest(other, shardings)
    assert os.listdir(directory) == ["1"]


FAILED_SAVE = textwrap.dedent("""
    import resource, signal, sys
    from test_faults import _tiny_state
    from imagpose_jax.checkpoint.train_state import TrainCheckpointer
    state, _ = _tiny_state(1)
    ck = TrainCheckpointer(sys.argv[1], keep=3)
    ck.save(1, state)
    ck.wait()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # files may not grow past 4 KiB: writes fail as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    try:  # as the training loop: saves every few steps, close() in a finally
        for step in (2, 3):
            ck.save(step, state)
    finally:
        ck.close()
""")


def test_failed_save_stops_with_one_error_and_no_temporary_folder(tmp_path):
    # Before: 420 lines on stderr (orbax logged the failure from four threads, each with a full traceback, then
    # its ValueError "OUT_OF_RANGE: Error writing ... in OCDBT database" surfaced in the next save) and
    # 2.orbax-checkpoint-tmp/ stayed on the disk.
    from imagpose_jax.checkpoint.train_state import TrainCheckpointer
    directory = str(tmp_path / "checkpoints")
    r = subprocess.run([sys.executable, "-c", FAILED_SAVE, directory], cwd=ROOT, env=cpu_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "CheckpointError" in line and not line.startswith(" ")]
    assert len(errors) == 1, r.stderr[-3000:]  # (orbax's own threads may still log a line after it)
    assert errors[0].startswith("imagpose_jax.checkpoint.train_state.CheckpointError: saving checkpoint step 2 to "
                                f"{directory} failed (") and errors[0].endswith("newest complete checkpoint is step 1")
    assert "During handling" not in r.stderr and len(r.stderr.splitlines()) < 60, r.stderr[-3000:]
    assert os.listdir(directory) == ["1"]  # no *.orbax-checkpoint-tmp* left
    assert TrainCheckpointer(directory).all_steps() == [1]


# ---------------------------------------------------------------- images of every mode

def _write_png16_rgb(path: str, a: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _reads(path: str) -> list[np.ndarray]:
    """The image as each entry point reads it: load_image, as_rgb_image of an opened file, the data pipeline."""
    from imagpose_jax.data.pipeline import _open_rgb
    with Image.open(path) as im:
        opened = as_rgb_image(im)
        opened.load()
    return [np.asarray(load_image(path)), np.asarray(opened), np.asarray(_open_rgb(path))]


def _over_backdrop(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return rgb * a + np.array(BACKDROP) * (1 - a)


def test_16_bit_images_scaled_to_8_bits(tmp_path):
    # Before: a 16-bit grayscale PNG (mode I;16) went through PIL's convert("RGB"), which clips: 99.6% white.
    # (A 16-bit RGB PNG was already read right: PIL keeps the high bytes.)
    gray = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as im:
        assert im.mode == "I;16"
    want = np.repeat(np.round(gray / 257.0)[..., None], 3, -1)
    for got in _reads(str(tmp_path / "gray16.png")):
        assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
        np.testing.assert_array_equal(got, want)
    i32 = Image.fromarray(gray.astype(np.int32), "I")  # mode I (32-bit integers, as 16-bit TIFFs can open)
    np.testing.assert_array_equal(np.asarray(to_rgb(i32)), want)
    rgb = np.random.default_rng(0).integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    _write_png16_rgb(str(tmp_path / "rgb16.png"), rgb)
    for got in _reads(str(tmp_path / "rgb16.png")):
        assert np.abs(got.astype(int) - np.round(rgb / 257.0)).max() <= 1


def test_transparent_images_over_the_backdrop(tmp_path):
    # Before: convert("RGB") dropped the alpha, showing whatever colour transparent pixels held (black here,
    # a black figure outline or background the model never saw).
    rgb = np.array([[[0, 0, 0], [200, 10, 50], [30, 160, 90], [255, 255, 255]]], np.uint8)
    alpha = np.array([[0, 255, 128, 60]], np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.stack([rgb[..., 1], alpha], -1), "LA").save(tmp_path / "la.png")
    p = Image.new("P", (3, 1))
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    for x in range(3):
        p.putpixel((x, 0), x)
    p.save(tmp_path / "p_transparent.png", transparency=0)
    cases = {"rgba.png": _over_backdrop(rgb, alpha),
             "la.png": _over_backdrop(np.repeat(rgb[..., 1:2], 3, -1), alpha),
             "p_transparent.png": np.array([[BACKDROP, (255, 0, 0), (0, 0, 255)]])}
    for name, want in cases.items():
        for got in _reads(str(tmp_path / name)):
            assert np.abs(got.astype(int) - want).max() <= 1, (name, got, want)
    assert BACKDROP == (240, 240, 240)


def test_palette_gray_and_cmyk_images(tmp_path):
    # Before: already right (PIL's own conversion); kept so (palette without transparency, L, 1, CMYK).
    p = Image.new("P", (2, 1))
    p.putpalette([12, 34, 56, 200, 100, 0])
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    gray = np.array([[0, 77, 255]], np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    Image.fromarray(np.array([[0, 255]], np.uint8), "L").convert("1").save(tmp_path / "bw.png")
    cmyk = np.array([[[10, 20, 30, 40], [0, 0, 0, 0]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    c, k = cmyk[..., :3].astype(float) / 255, cmyk[..., 3:].astype(float) / 255
    cases = {"p.png": np.array([[[12, 34, 56], [200, 100, 0]]]), "l.png": np.repeat(gray[..., None], 3, -1),
             "bw.png": np.array([[[0] * 3, [255] * 3]]), "cmyk.tif": 255 * (1 - c) * (1 - k)}
    for name, want in cases.items():
        for got in _reads(str(tmp_path / name)):
            assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1, (name, got, want)


# ---------------------------------------------------------------- training data: every file read before training

def _smooth_image(size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(np.cumsum(rng.integers(0, 9, (size, size, 3)), axis=1), 0, 255).astype(np.uint8)


def test_check_file_reads_the_whole_file(tmp_path):
    # Before: no check (`read_imagpose_json` only checked that each file exists). A PNG with damaged bytes inside
    # its compressed data can even decode without an error (to a wrong image); the check reads its CRCs.
    from imagpose_jax.data.check import check_file
    for ext in ("png", "jpg"):
        Image.fromarray(_smooth_image()).save(tmp_path / f"good.{ext}")
        data = (tmp_path / f"good.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[:len(data) * 2 // 3])
    data = bytearray((tmp_path / "good.png").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.png").write_bytes(bytes(data))
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases = {"good.png": None, "good.jpg": None, "cut.png": "Truncated File Read",
             "cut.jpg": "image file is truncated", "flipped.png": "broken PNG file (bad header checksum in b'IDAT')",
             "empty.jpg": "cannot identify image file", "missing.png": "No such file or directory"}
    for name, want in cases.items():
        got = check_file(str(tmp_path / name))
        assert (got is None) if want is None else (got is not None and want in got), (name, got)


@pytest.fixture()
def dataset(tmp_path):
    """A tiny synthetic training index (3 persons x 3 views: 9 images and 9 pose renderings, 64x64 PNGs) whose
    second person's second image is truncated -> (its config, the truncated file)."""
    from train_fixtures import tiny_config
    from imagpose_jax.data.synthetic import make_synthetic_dataset
    index = make_synthetic_dataset(str(tmp_path / "data"), num_persons=3, poses_per_person=3, height=64, width=64,
                                   seed=0, test_fraction=0.0)["train"].index_json
    bad = str(tmp_path / "data" / "train" / "image" / "person0001_01.png")
    os.truncate(bad, os.path.getsize(bad) // 2)
    c = tiny_config(2)
    c.data.update(format="imagpose_json", index=index)
    return c, bad


def test_unreadable_image_stops_training_before_it_starts(dataset, tmp_path):
    # Before: nothing was read before training; the truncated image stopped the run when first drawn (steps, or
    # hours, in), with no hint about data.skip_corrupt.
    import jax
    from imagpose_jax.data.pipeline import CorruptImageError
    from imagpose_jax.sharding import make_mesh
    from imagpose_jax.train.inputs import train_iterator
    c, bad = dataset
    mesh = make_mesh(devices=jax.devices()[:1])
    with pytest.raises(CorruptImageError) as err:
        train_iterator(c, str(tmp_path), mesh)
    assert str(err.value).startswith(f"cannot read image {bad!r}: OSError: Truncated File Read; set "
                                     "--config.data.skip_corrupt=True to skip the examples")
    assert err.value.path == bad


def test_skip_corrupt_leaves_out_unreadable_views_up_to_the_fraction(dataset, caplog):
    # Before: with skip_corrupt every example drawing the file was skipped, however many files were bad (all of
    # them: an endless loop); now the views are left out before training, up to data.max_corrupt_fraction.
    from imagpose_jax.data.check import check_images
    from imagpose_jax.data.index import read_imagpose_json
    from imagpose_jax.data.pipeline import CorruptDataError
    c, bad = dataset
    persons = read_imagpose_json(c.data.index)
    with pytest.raises(CorruptDataError, match=r"^1 of 18 image files \(5\.6%\) are unreadable, more than "
                                               r"data\.max_corrupt_fraction=0\.01; the first: " + re.escape(repr(bad))):
        check_images(persons, skip_corrupt=True, max_corrupt_fraction=0.01)
    with caplog.at_level(logging.WARNING):
        kept = check_images(persons, skip_corrupt=True, max_corrupt_fraction=0.1)
    assert [[os.path.basename(v.image) for v in p.views] for p in kept] == [
        [f"person000{i}_0{j}.png" for j in range(3) if (i, j) != (1, 1)] for i in range(3)]
    assert any("1 of 18 image files are unreadable" in r.getMessage() and bad in r.getMessage() for r in caplog.records)


def _unreadable_person(tmp_path) -> "Person":
    from imagpose_jax.data.index import Person, View
    paths = [str(tmp_path / "image" / f"gone_{i}.png") for i in range(2)]
    return Person("gone", tuple(View(image=p, pose_image=p.replace("image", "dwpose")) for p in paths))


def test_skipping_gives_up_past_the_fraction(tmp_path):
    # Before: with skip_corrupt=True and every file unreadable (e.g. the data's file system gone), `next()` looped
    # forever; an out-of-range fraction was not a key then.
    from imagpose_jax.data.pipeline import CorruptDataError, make_train_iterator
    person = _unreadable_person(tmp_path)
    it = make_train_iterator([person], 64, 64, batch_size=1, seed=0, shard_index=0, shard_count=1, skip_corrupt=True,
                             max_corrupt_fraction=0.01)
    with pytest.raises(CorruptDataError) as err:
        next(it)
    msg = str(err.value)
    assert msg.startswith("100 of the 100 training examples drawn so far were skipped for unreadable files (100.0%), "
                          "more than data.max_corrupt_fraction=0.01: giving up (the last: cannot read image "), msg
    assert str(tmp_path / "image" / "gone_") in msg and it.skipped_corrupt == 100
    with pytest.raises(ValueError, match=r"data\.max_corrupt_fraction must be in \[0, 1\), got 1\.5"):
        make_train_iterator([person], 64, 64, batch_size=1, seed=0, skip_corrupt=True, max_corrupt_fraction=1.5)


def test_unreadable_image_during_training_names_it_with_the_hint(tmp_path):
    # Before: "cannot read image '...': FileNotFoundError: ..." and no word of data.skip_corrupt.
    from imagpose_jax.data.pipeline import CorruptImageError, make_train_iterator
    it = make_train_iterator([_unreadable_person(tmp_path)], 64, 64, batch_size=1, seed=0, shard_index=0,
                             shard_count=1)
    with pytest.raises(CorruptImageError) as err:
        next(it)
    assert str(tmp_path / "image" / "gone_") in str(err.value)
    assert str(err.value).endswith("; set --config.data.skip_corrupt=True to skip the examples that use an unreadable "
                                   "file (giving up past data.max_corrupt_fraction of them)")


@pytest.mark.parametrize("name", ["stage1.py", "stage2.py", "stage3.py", "stage2.py:tiny", "demo.py"])
def test_every_config_has_the_data_check_keys(name):
    # Before: data.check_images and data.max_corrupt_fraction did not exist.
    from imagpose_jax.train.config import load_config
    d = load_config(os.path.join(ROOT, "configs", name)).data
    assert (d.check_images, d.skip_corrupt, d.max_corrupt_fraction) == (True, False, 0.01)


# ---------------------------------------------------------------- no NaN or inf written or read as a parameter

def test_nonfinite_parameters_are_never_written(tmp_path, monkeypatch):
    # Before: save_params and TrainCheckpointer.save wrote NaN without a word (a NaN in a pretrained VAE's decoder,
    # which no training loss sees, reached every checkpoint and the export).
    import jax.numpy as jnp
    from flax import nnx
    from imagpose_jax.checkpoint import finite, save_params
    from imagpose_jax.checkpoint.finite import NonFiniteParamsError
    from imagpose_jax.checkpoint.train_state import TrainCheckpointer
    bad = np.ones((2, 3), np.float32)
    bad[1, 2] = np.nan
    params = nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param)
    params["kernel"].set_value(bad.T)
    folder = str(tmp_path / "export" / "denoiser")
    with pytest.raises(NonFiniteParamsError, match=re.escape(f"{folder}/params.safetensors not written: tensor "
                                                             "'kernel' holds NaN or inf")):
        save_params(folder, {}, params)
    assert not os.path.exists(folder)

    state, _ = _tiny_state(1)
    state["kernel"].set_value(np.where(np.arange(64 * 64).reshape(64, 64) == 7, np.inf, 1.0).astype(np.float32))
    directory = str(tmp_path / "checkpoints")
    ck = TrainCheckpointer(directory)
    with pytest.raises(NonFiniteParamsError, match=re.escape(f"checkpoint step 3 not saved to {directory}: tensor "
                                                             "'kernel' holds NaN or inf")):
        ck.save(3, state)
    ck.close()
    assert ck.all_steps() == [] and not glob.glob(f"{directory}/3*")

    monkeypatch.setattr(finite, "_on_host", lambda v: isinstance(v, np.ndarray))  # as on an accelerator
    named = {"a": jnp.ones(3), "b": jnp.array([0.0, -jnp.inf]), "c": np.float32([np.nan]), "n": jnp.arange(3)}
    assert finite.nonfinite(named) == ["b", "c"]


def _damaged_denoiser(converted, tmp_path, damage) -> tuple[str, str]:
    """A copy of the converted denoiser folder, its params.safetensors damaged -> (folder, the file)."""
    folder = str(tmp_path / "denoiser")
    shutil.copytree(os.path.join(converted[1], "denoiser"), folder)
    path = os.path.join(folder, "params.safetensors")
    damage(path)
    return folder, path


def test_nan_in_a_parameter_folder_is_refused_on_reading(converted, tmp_path):
    # Before: `imagpose-convert export` wrote the NaN into denoising_unet-0.pth and exited 0.
    from safetensors.numpy import load_file, save_file
    from convert_weights.cli import main
    key = "unet.conv_in.kernel"

    def nan(path):
        tensors = load_file(path)
        tensors[key][0, 0, 0, 0] = np.nan
        save_file(tensors, path)
    folder, path = _damaged_denoiser(converted, tmp_path, nan)
    out = str(tmp_path / "torch")
    with pytest.raises(SystemExit) as err:
        main(["export", "--params", folder, "--out", out])
    assert str(err.value) == f"error: {path}: tensor {key!r} holds NaN or inf (IMAGPOSE_DEBUG=1 shows the traceback)"
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["denoiser"]


def test_truncated_params_file_is_named(converted, tmp_path):
    # Before: safetensors' "Error while deserializing header: incomplete metadata, file not fully covered", no path.
    from imagpose_jax.checkpoint.params import load_model
    folder, path = _damaged_denoiser(converted, tmp_path, lambda p: os.truncate(p, os.path.getsize(p) // 2))
    with pytest.raises(ValueError) as err:
        load_model(folder)
    assert str(err.value).startswith(f"{path} is damaged ({os.path.getsize(path)} bytes; truncated, or not a "
                                     "safetensors file?): ")
    assert str(err.value).endswith("Convert or export it again")


# ---------------------------------------------------------------- one-line errors

def test_a_random_file_as_pth_is_one_line_naming_it(converted, tmp_path):
    # Before: a ConversionError traceback carrying torch's advice: "Re-running `torch.load` with `weights_only` set
    # to `False` will likely succeed, but it can result in arbitrary code execution ...".
    import argparse
    import torch
    from convert_weights.cli import main
    from convert_weights.core import ConversionError, load_torch_file
    src = converted[0]
    rand = tmp_path / "denoising_unet-0.pth"
    rand.write_bytes(b"\x00\x13" + np.random.default_rng(0).bytes(4094))
    with pytest.raises(SystemExit) as err:
        main(["imagpose", "--unet", str(rand), "--pose-guider", f"{src}/pose_guider-0.pth", "--patch",
              f"{src}/patch-0.pth", "--config", f"{src}/config.json", "--out", str(tmp_path / "out")])
    assert str(err.value) == (f"error: cannot read checkpoint {rand}: not a PyTorch checkpoint (neither a torch.save "
                              f"zip archive nor a pickle; it starts with {rand.read_bytes()[:4]!r}) "
                              "(IMAGPOSE_DEBUG=1 shows the traceback)")
    assert not os.path.exists(tmp_path / "out")
    pickled = tmp_path / "with_args.pth"  # a torch file holding more than tensors (e.g. a training script's args)
    torch.save({"conv_in.weight": torch.zeros(1), "args": argparse.Namespace(lr=1)}, pickled)
    with pytest.raises(ConversionError) as err:
        load_torch_file(pickled)
    assert str(err.value) == (f"cannot read checkpoint {pickled}: not a plain state dict of tensors (Unsupported "
                              "global: GLOBAL argparse.Namespace was not an allowed global by default); only weights "
                              "are read (torch.load weights_only=True): save its state dict alone, "
                              "torch.save(model.state_dict(), ...)")


def test_zero_counts_are_refused_naming_the_setting(capsys):
    # Before: `--config.data.batch_size=0` (and train.log_every=0) passed the command line and failed deep in the
    # run (an empty batch; a modulo by zero) after the models were built; `imagpose evaluate --batch-size -1` loaded
    # its LPIPS and Inception weights first.
    from imagpose_jax.cli import main as cli_main
    from imagpose_jax.train.main import parse
    train = ["--config", os.path.join(ROOT, "configs/stage2.py:tiny"), "--workdir", "unused"]
    for override, error in [("steps=0", "steps must be at least 1, got 0"),
                            ("data.batch_size=0", "data.batch_size must be at least 1, got 0"),
                            ("data.batch_size=-1", "data.batch_size must be at least 1, got -1"),
                            ("train.log_every=0", "train.log_every must be at least 1, got 0")]:
        with pytest.raises(SystemExit) as err:
            parse([*train, f"--config.{override}"])
        assert str(err.value) == f"imagpose train: error: {error}"
    generate = ["generate", "--weights", "w", "--source", "s.png", "--source-pose", "s.json", "--target-pose", "t.json",
                "--out", "o"]
    for n in ("0", "-1"):
        with pytest.raises(SystemExit, match=f"^error: --batch-size must be at least 1, got {n}$"):
            cli_main([*generate, "--batch-size", n])
    with pytest.raises(SystemExit) as err:
        cli_main(["evaluate", "--generated", "g", "--targets", "t", "--out", "o", "--batch-size", "-1"])
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: --batch-size must be at least 1, got -1")
