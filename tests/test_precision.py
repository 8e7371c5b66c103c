"""Half precision (`imagpose generate --dtype`): the weights are loaded straight into the dtype, every module
computes in it, and the sampler's program runs its matmuls and convolutions in it, keeping float32 where the
original does (norm statistics, softmax, the latents and the scheduler). Values: tests/test_golden.py's
half-precision pipeline case."""
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

from imagpose_jax.checkpoint.folder import PipelineFolder
from imagpose_jax.checkpoint.params import save_params
from imagpose_jax.cli import main as cli_main
from imagpose_jax.models.layers import DTYPES, parse_dtype
from imagpose_jax.sampling.pipeline import IMAGPosePipeline, load_pipeline_models
from imagpose_jax.sampling.sampler import Sampler, SamplerConfig
from imagpose_jax.testing import TINY_DINO, TINY_VAE, random_batch, tiny_model_config

HALF = ("bfloat16", "float16")
# DINOv2 as dinov2-base is: position embeddings for 518x518 (a 37x37 grid), resized for the 224x224 input
DINO = {**TINY_DINO, "image_size": 518}
# dot_general / conv_general_dilated left in float32 on purpose in the sampler's program: DINOv2's bicubic resize
# of its position table (`Dinov2Embeddings.position_encoding`: two matmuls on a (37, 37, D) parameter)
FLOAT32_MATMULS_KEPT = Counter({("dot_general", ("float32", "float32")): 2})


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An inference folder of the tiny models with random weights (drawn on the host: no per-shape compiles), and
    those float32 weights."""
    from imagpose_jax.models.dinov2 import Dinov2Config, Dinov2Model
    from imagpose_jax.models.imagpose import IMAGPose
    from imagpose_jax.models.init import abstract
    from imagpose_jax.models.vae import AutoencoderKL, VAEConfig
    rng = np.random.default_rng(0)
    out = PipelineFolder(tmp_path_factory.mktemp("weights"))
    params, cfg = [], tiny_model_config()
    for part, config, ctor in ((out.denoiser, cfg.to_dict(), lambda k: IMAGPose(cfg, rngs=k)),
                               (out.vae, TINY_VAE, lambda k: AutoencoderKL(VAEConfig.from_dict(TINY_VAE), rngs=k)),
                               (out.image_encoder, DINO, lambda k: Dinov2Model(Dinov2Config.from_dict(DINO), rngs=k))):
        state = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                             nnx.state(abstract(ctor), nnx.Param))
        save_params(part, config, state)
        params.append(state)
    return out.root, params


@pytest.fixture(scope="module")
def loaded(weights):
    """dtype name -> the folder's (IMAGPose, VAE, DINOv2) loaded in it (`load_pipeline_models`), loaded once."""
    cache = {}

    def load(dtype: str):
        if dtype not in cache:
            cache[dtype] = load_pipeline_models(weights[0], dtype)
        return cache[dtype]
    return load


def test_dtype_names():
    assert parse_dtype(None) is None and parse_dtype("float32") is None and parse_dtype(jnp.float32) is None
    assert parse_dtype("bfloat16") == jnp.bfloat16 and parse_dtype(jnp.float16) == jnp.float16
    with pytest.raises(ValueError, match="unsupported dtype 'bf16'; choose one of float32, bfloat16, float16"):
        parse_dtype("bf16")


def test_cli_dtype(monkeypatch, capsys):
    seen = []

    def from_pretrained(weights, cfg, dtype):   # stands in for loading weights: record the dtype and stop
        seen.append(dtype)
        raise KeyboardInterrupt

    monkeypatch.setattr(IMAGPosePipeline, "from_pretrained", staticmethod(from_pretrained))
    argv = ["generate", "--weights", "w", "--source", "a.png", "--source-pose", "a.json", "--target-pose", "t.json",
            "--out", "o"]
    for extra in ([], ["--dtype", "bfloat16"]):
        with pytest.raises(KeyboardInterrupt):
            cli_main(argv + extra)
    assert seen == ["float32", "bfloat16"]
    with pytest.raises(SystemExit):
        cli_main(argv + ["--dtype", "bf16"])
    assert "invalid choice: 'bf16' (choose from 'float32', 'bfloat16', 'float16')" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", HALF)
def test_weights_loaded_straight_into_the_dtype(weights, loaded, dtype):
    want = DTYPES[dtype]
    for module, original in zip(loaded(dtype), weights[1]):
        leaves = dict(nnx.to_flat_state(nnx.state(module)))
        other = [".".join(map(str, p)) for p, v in leaves.items() if v.get_value().dtype != want]
        assert leaves
        assert not other, f"{len(other)} leaves not in {dtype}, e.g. {other[:5]}"   # no float32 copy
        for path, v in nnx.to_flat_state(original):   # the float32 weights, rounded once
            expected = np.asarray(v.get_value()).astype(want)
            np.testing.assert_array_equal(np.asarray(leaves[path].get_value()), expected, err_msg=str(path))
        layers = [m for _, m in nnx.iter_graph(module) if isinstance(m, (nnx.Linear, nnx.Conv, nnx.GroupNorm,
                                                                         nnx.LayerNorm))]
        assert layers and all(m.dtype == want for m in layers)   # and every layer computes in it


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (jit, while, scan, cond, remat, custom_jvp...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from _eqns(sub)


def _program_dtypes(sampler):
    jaxpr = sampler.trace(random_batch(1, 64, 64), key=jax.random.key(0)).jaxpr
    eqns = list(_eqns(jaxpr.jaxpr))
    matmuls = Counter((e.primitive.name, tuple(str(v.aval.dtype) for v in e.invars)) for e in eqns
                      if e.primitive.name in ("dot_general", "conv_general_dilated"))
    reductions = Counter(str(e.invars[0].aval.dtype) for e in eqns if e.primitive.name in ("reduce_sum", "reduce_max"))
    loops = [e for e in eqns if e.primitive.name in ("scan", "while")]   # fori_loop: a scan with static bounds
    return matmuls, reductions, loops, jaxpr.out_avals


def _ops(counts: Counter) -> Counter:
    out = Counter()
    for (op, _), n in counts.items():
        out[op] += n
    return out


def test_sampler_program_computes_in_bfloat16(loaded):
    cfg = SamplerConfig(num_inference_steps=2)
    full, full_red, _, _ = _program_dtypes(Sampler(*loaded("float32"), cfg))
    half, half_red, loops, outs = _program_dtypes(Sampler(*loaded("bfloat16"), cfg))
    # the same matmuls and convolutions, all in float32 for the float32 models ...
    assert sum(full.values()) == sum(half.values()) > 50
    assert _ops(full) == _ops(half) and {d for _, ds in full for d in ds} == {"float32"}
    # ... and in bfloat16 for the bfloat16 ones: no silent upcast of any layer, except those kept on purpose
    upcast = Counter({k: n for k, n in half.items() if set(k[1]) != {"bfloat16"}})
    assert upcast == FLOAT32_MATMULS_KEPT, f"matmuls not in bfloat16: {dict(upcast)}"
    # every reduction (GroupNorm / LayerNorm statistics, softmax max and sum) in float32, in both programs
    assert set(half_red) == set(full_red) == {"float32"} and sum(half_red.values()) == sum(full_red.values())
    # the denoising loop carries float32 latents (1, 16, 16, 4); the images come back float32
    carried = [(v.aval.shape, str(v.aval.dtype)) for e in loops for v in e.outvars]
    assert ((1, 16, 16, 4), "float32") in carried and ((1, 16, 16, 4), "bfloat16") not in carried
    assert [str(a.dtype) for a in outs] == ["float32"]
