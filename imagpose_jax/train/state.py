"""The training state: the IMAGPose model (fp32 master weights), the frozen VAE and DINOv2, an optimizer
holding Adam moments for the trainable parameters only, an optional EMA of those, and the step's RNG key.

`init_train_state` builds it abstractly first (`nnx.eval_shape`, no allocation), derives every leaf's
sharding from the partition rules, then runs the construction once under `jax.jit` with those output
shardings: each device allocates and initialises only its own shards, nothing is materialised whole on
one host. Training works on the pair (graphdef, state) that this returns (`nnx.merge` gives the module).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from imagpose_jax.models.init import jit_state
from imagpose_jax.sharding.rules import PARTITION_RULES, Rules, state_shardings


class EmaParam(nnx.Variable):
    """An exponential moving average of a trainable parameter (not an `nnx.Param`: never trained itself)."""


def lr_shape(schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 0) -> optax.Schedule | None:
    """The learning rate's course over the steps with peak 1 (the step multiplies it by `optim.learning_rate`):
    schedule "constant" (the original's, spec section 6; None: 1 throughout) or "cosine" (decay to 0.1 at
    `total_steps`, for short runs); either after a linear warm-up of `warmup_steps`."""
    if schedule == "constant":
        if not warmup_steps:
            return None
        return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup_steps), optax.constant_schedule(1.0)],
                                    [warmup_steps])
    if schedule == "cosine":
        if total_steps <= warmup_steps:
            raise ValueError(f"cosine schedule: total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps, total_steps, 0.1)
    raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {schedule!r}")


def scale_by_learning_rate(shape: optax.Schedule | None) -> optax.GradientTransformationExtraArgs:
    """optax's `scale_by_learning_rate` with the peak learning rate an argument of `update` (`learning_rate=`, a
    float32 scalar) instead of a constant: it is an input of the compiled train step, so that a run with another
    learning rate, or resumed with one, runs the same program. `shape` (`lr_shape`; None: 1 throughout) scales it per
    step; the state is optax's own step count."""
    shape = shape or optax.constant_schedule(1.0)

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, learning_rate, **extra):
        step_size = -learning_rate * shape(state.count)
        return (jax.tree.map(lambda g: (step_size * g).astype(g.dtype), updates),
                optax.ScaleByScheduleState(count=optax.safe_increment(state.count)))
    return optax.GradientTransformationExtraArgs(init, update)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`inner`, its update skipped when the gradient's global norm is not finite (any element NaN or inf, or the sum
    of squares past float32's range): zero updates, `inner`'s state (moments, step counts) kept. The predicate is the
    train step's `finite` metric; the norm is the one `clip_by_global_norm` computes (XLA computes it once).

    Not optax's `apply_if_finite`: that tests each gradient leaf on its own and branches with `lax.cond`, a barrier
    that XLA neither fuses across nor compiles quickly (the tiny stage-3 optimizer update: 20.1 s of compile on
    this 2-core machine against 10.4 s with these selects, which fuse into Adam's elementwise kernels)."""
    def update(updates, state, params=None, **extra):
        finite = jnp.isfinite(optax.global_norm(updates))
        new_updates, new_state = inner.update(updates, state, params, **extra)
        return (jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates),
                jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state))
    return optax.GradientTransformationExtraArgs(inner.init, update)


@functools.lru_cache(maxsize=None)
def make_tx(b1: float = 0.9, b2: float = 0.999, weight_decay: float = 0.01, eps: float = 1e-8, clip_norm: float = 1.0,
            schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 0) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (optax's `adamw`, its learning rate `update`'s `learning_rate=` argument times
    `lr_shape`), skipped on a non-finite gradient (`skip_nonfinite`). Memoised: equal arguments give the same
    (stateless) transformation, so the graphdefs of equal configs are equal and share a compiled train step."""
    adamw = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.add_decayed_weights(weight_decay),
                        scale_by_learning_rate(lr_shape(schedule, warmup_steps, total_steps)))
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    # A non-finite gradient skips the whole update (zero updates, moments and step count kept): the parameters never
    # become non-finite. The loop stops the run after `train.max_nonfinite` such steps in a row.
    return skip_nonfinite(tx)


class TrainState(nnx.Module):
    def __init__(self, model: nnx.Module, vae: nnx.Module, dino: nnx.Module, tx: optax.GradientTransformation,
                 trainable: nnx.filterlib.Filter, *, seed: int, ema: bool = False):
        self.model, self.vae, self.dino = model, vae, dino
        self.trainable = trainable
        self.optimizer = nnx.Optimizer(model, tx, wrt=trainable)
        self.ema = nnx.data(_ema_copy(nnx.state(model, trainable)) if ema else None)
        self.rng = nnx.Variable(jax.random.key(seed))

    @property
    def step(self) -> jax.Array:
        return self.optimizer.step.get_value()


def _ema_copy(params: nnx.State) -> nnx.State:
    return jax.tree.map(lambda v: EmaParam(v.get_value()), params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_train_state(build: Callable[[], TrainState], mesh: Mesh,
                         rules: Rules = PARTITION_RULES) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`build()` traced without allocating -> (graphdef, the state as `jax.ShapeDtypeStruct`s carrying their
    shardings, the shardings). What `init_train_state` allocates, and what `TrainStep.lower` compiles for (also for
    devices this host does not have, e.g. a TPU topology)."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(abstract_state, mesh, rules)
    spec = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    return graphdef, spec, shardings


def init_train_state(build: Callable[[], TrainState], mesh: Mesh,
                     rules: Rules = PARTITION_RULES) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`build()` (constructing models with `ParamKeys`, never `nnx.Rngs`) -> (graphdef, sharded state, shardings):
    `abstract_train_state`, then the construction once under `jax.jit` with those output
    shardings (`models.init.jit_state`)."""
    graphdef, _, shardings = abstract_train_state(build, mesh, rules)
    return graphdef, jit_state(build, shardings), shardings

