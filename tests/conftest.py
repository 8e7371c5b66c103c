import atexit
import os
import shutil
import tempfile

# Tests run on the CPU with exact float32 matmuls, whatever machine they are on.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# XLA:CPU without LLVM's optimisations (the tests' subprocesses inherit it): the suite is compile-bound (most programs
# run a few times), LLVM's passes are much of XLA:CPU's compile time, and floating-point semantics are the same at
# every level (no fast-math at any). 2-core machine, 2026-12-02: test_golden.py 254 -> 207 s, test_demo.py with
# test_sampler.py and test_metrics.py 228 -> 182 s. Prepended to XLA_FLAGS as given; benchmarks/ keep XLA's default.
os.environ["XLA_FLAGS"] = f"--xla_backend_optimization_level=0 {os.environ.get('XLA_FLAGS', '')}".strip()

# One persistent compilation cache for the session, inherited by the tests' subprocesses (the CLI and
# multi-device tests compile the same tiny programs as the in-process ones). Set JAX_COMPILATION_CACHE_DIR
# to keep a cache across sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="imagpose-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """An inference folder of the tiny random-weight models (`testing.save_tiny_pipeline`), for the commands that
    load weights (`imagpose test`, `imagpose generate`)."""
    from imagpose_jax.testing import save_tiny_pipeline
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_weights"))


# The heaviest test files first, in the order of their measured time (`--durations`, 2-core machine, 2026-12-02:
# test_train_loop 266 s, test_golden 214 s, test_train_sharding 187 s ... test_metrics 20 s), so that the two
# pytest-xdist workers (`--dist loadfile --no-loadscope-reorder`, pytest.ini) finish together: longest-first
# scheduling. The other files follow in their usual order.
HEAVY_FIRST = ("test_train_loop.py", "test_golden.py", "test_train_sharding.py", "test_aot.py", "test_demo.py",
               "test_vae_factor.py", "test_convert_unet.py", "test_sampler_devices.py", "test_train_step.py",
               "test_sampler.py", "test_train_vae.py", "test_evaluate_cli.py", "test_metrics.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
