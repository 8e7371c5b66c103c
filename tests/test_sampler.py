"""The sampler as one compiled program, and the high-level pipeline's input checks."""
import jax
import numpy as np
import pytest

from imagpose_jax.cli import main as cli_main
from imagpose_jax.data.batch import Batch
from imagpose_jax.testing import random_batch, tiny_models

from imagpose_jax.sampling.pipeline import IMAGPosePipeline
from imagpose_jax.sampling.sampler import DEFAULT_SCHEDULER, Sampler, SamplerConfig
from imagpose_jax.schedulers import make_scheduler



@pytest.fixture(scope="module")
def models():
    return tiny_models(0)   # the zero-initialised layers get weights: the pose and CVA paths reach the output


def _batch(n, seed, view=64):
    return random_batch(n, view, view, seed=seed)


@pytest.fixture(scope="module")
def pipe(models):
    return IMAGPosePipeline(*models, SamplerConfig(num_inference_steps=2))


def test_compiled_once_and_batch_independent(pipe):
    sampler = pipe.sampler
    noise = np.random.default_rng(9).standard_normal((2, 16, 16, 4)).astype(np.float32)
    b = _batch(2, 0)
    first = sampler(Batch(*(x[:1] for x in b)), noise=noise[:1])
    assert first.shape == (1, 128, 128, 3) and 0 <= first.min() and first.max() <= 1
    other = sampler(Batch(*(x[1:] for x in b)), noise=noise[1:])   # new inputs, same shapes: no new trace
    assert sampler.traces == 1 and not np.allclose(first, other)
    both = sampler(b, noise=noise)                                        # a new batch size compiles once more
    assert sampler.traces == 2
    np.testing.assert_allclose(both[0], first[0], atol=2e-5)   # a grid's result does not depend on its batch mates
    np.testing.assert_allclose(both[1], other[0], atol=2e-5)


def test_pipeline_input_errors(pipe, tmp_path):
    img = np.zeros((70, 50, 3), np.uint8)
    kp = np.full((18, 2), 10.0)
    assert pipe.sampler.view_multiple == 16             # the tiny UNet: two levels, quadrants; 8 pixels per latent
    with pytest.raises(ValueError, match="not a multiple of 16"):
        pipe.prepare([img], [kp], [kp], (100, 64))
    with pytest.raises(ValueError, match="1 source image.*2 source pose"):
        pipe.prepare([img], [kp, kp], [kp], (64, 64))
    with pytest.raises(ValueError, match=r"shape \(18, 2\)"):
        pipe.prepare([img], [np.zeros((17, 2))], [kp], (64, 64))
    with pytest.raises(ValueError, match="at most 3 source"):
        pipe.prepare([img] * 4, [kp] * 4, [kp], (64, 64))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        pipe.prepare([str(bad)], [kp], [kp], (64, 64))


def test_pipeline_scenarios_give_one_image_per_target(pipe):
    img = np.random.default_rng(0).integers(0, 255, (80, 60, 3), dtype=np.uint8)
    kp = np.random.default_rng(1).uniform(5, 60, (18, 2))
    res = pipe([img], [kp], [kp] * 4, view_size=(64, 64), batch_size=1, progress=False)   # scenario 2, two grids
    assert len(res.targets) == 4 and len(res.layouts) == 2 and res.targets[0].shape == (64, 64, 3)
    res3 = pipe([img, img, img], [kp] * 3, [kp], view_size=(64, 64), progress=False)       # scenario 3
    assert len(res3.targets) == 1 and res3.layouts[0].known == (True, True, True, False)


def test_dpm_solver_sampler_compiles_once(models):
    cfg = SamplerConfig(num_inference_steps=3, scheduler="dpmsolver++")   # with the default (DDIM-flavoured) config
    sampler = Sampler(*models, cfg)
    first = sampler(_batch(1, 3), key=jax.random.key(0))
    second = sampler(_batch(1, 4), key=jax.random.key(1))
    assert sampler.traces == 1 and first.shape == (1, 128, 128, 3)
    assert np.isfinite(first).all() and np.isfinite(second).all() and not np.allclose(first, second)
    with pytest.raises(NotImplementedError, match="eta=0.5"):   # DDIM-only keys only at their neutral values
        Sampler(*models, cfg.replace(scheduler_config={**DEFAULT_SCHEDULER, "eta": 0.5}))


def test_sampler_runs_a_model_built_with_block_remat(models):
    """The SD1.5 stage configs build the UNet with remat "block" (`imagpose train` samples with that model, and
    `imagpose aot --program sampler` compiles it): inside the sampler's loop over the steps it gives the images of
    remat "none" (it raised flax's TraceContextError when each block was wrapped in `nnx.remat`)."""
    cfg = SamplerConfig(num_inference_steps=2)
    block = Sampler(*tiny_models(0, remat="block"), cfg)(_batch(1, 3), key=jax.random.key(0))
    none = Sampler(*models, cfg)(_batch(1, 3), key=jax.random.key(0))
    np.testing.assert_array_equal(block, none)


@pytest.mark.parametrize("original", [False, True])
def test_cli_accepts_dpm_solver(monkeypatch, capsys, original):
    seen = []

    def from_pretrained(weights, cfg, dtype):   # stands in for loading weights: check the config and stop
        seen.append(make_scheduler(cfg.scheduler, cfg.scheduler_config, cfg.num_inference_steps))
        raise KeyboardInterrupt

    monkeypatch.setattr(IMAGPosePipeline, "from_pretrained", staticmethod(from_pretrained))
    argv = ["generate", "--weights", "w", "--source", "a.png", "--source-pose", "a.json", "--target-pose", "t.json",
            "--out", "o", "--steps", "18"] + (["--original-inference"] if original else [])
    with pytest.raises(KeyboardInterrupt):
        cli_main(argv + ["--scheduler", "dpmsolver++"])
    assert type(seen[0]).__name__ == "DPMSolverMultistep" and len(seen[0].timesteps) == 18
    with pytest.raises(SystemExit):
        cli_main(argv + ["--scheduler", "euler"])
    assert "invalid choice: 'euler'" in capsys.readouterr().err
