"""`models.init.concrete`: a module's parameters drawn in one jitted program (compiled as `init_compiler_options`
says for the platform) are the eager construction's, parameter for parameter, and follow the seed."""
import numpy as np
from flax import nnx

from imagpose_jax.models.init import ParamKeys, concrete, init_compiler_options


def small(rngs):   # normal, lecun-normal and constant initialisers; `rngs.params()` as our modules call it
    return nnx.Sequential(nnx.Conv(4, 8, (3, 3), rngs=rngs), nnx.GroupNorm(8, num_groups=4, rngs=rngs),
                          nnx.Linear(8, 16, rngs=rngs), nnx.Embed(10, 16, rngs=rngs))


def _params(module) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_concrete_equals_the_eager_construction():
    jitted = _params(concrete(small, seed=3))
    eager = _params(small(ParamKeys(3)))
    assert jitted.keys() == eager.keys()
    for p in eager:
        assert jitted[p].shape == eager[p].shape and jitted[p].dtype == eager[p].dtype, p
        np.testing.assert_allclose(jitted[p], eager[p], rtol=1e-5, atol=1e-6, err_msg=str(p))
    other = _params(concrete(small, seed=4))
    assert any(not np.array_equal(other[p], eager[p]) for p in eager if eager[p].std() > 0)


def test_init_compiler_options_per_platform():
    assert init_compiler_options("cpu") == {"xla_backend_optimization_level": 0}
    assert init_compiler_options("tpu") is None and init_compiler_options("gpu") is None
