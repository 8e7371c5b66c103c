"""Multistep DPM-Solver++ (Lu et al. 2022) as diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")`
computes it: config + immutable state, pure `step`, fewer steps than DDIM for the same quality.

The timesteps are static, so every step's update is a fixed linear map
  x_prev = c[i, 0] x + c[i, 1] m0 + c[i, 2] m1 + c[i, 3] m2      (m0: this step's x0 prediction, m1, m2: earlier ones)
whose coefficients (and the order each step uses) are worked out on the host with diffusers' float32 formulas.
The device step is then one gather and a weighted sum: no branching on the traced step index.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from imagpose_jax.schedulers.common import alphas_cumprod

KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "rescale_betas_zero_snr",
        "timestep_spacing", "steps_offset", "solver_order", "algorithm_type", "solver_type", "lower_order_final",
        "euler_at_final", "final_sigmas_type", "lambda_min_clipped"}
# accepted only at the value that changes nothing (diffusers' own options, and DDIM's `eta`/`clip_sample`, which the
# sampler's default config carries); anything else is an error rather than silently ignored
NEUTRAL = {"trained_betas": None, "thresholding": False, "variance_type": None, "use_karras_sigmas": False,
           "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
           "use_dynamic_shifting": False, "eta": 0.0, "clip_sample": False}
INERT = {"dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type", "clip_sample_range"}
CHOICES = {"algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint", "heun"), "solver_order": (1, 2, 3),
           "final_sigmas_type": ("zero", "sigma_min"), "prediction_type": ("epsilon", "v_prediction", "sample")}
DEFAULTS = {"num_train_timesteps": 1000, "timestep_spacing": "linspace", "steps_offset": 0, "solver_order": 2,
            "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
            "euler_at_final": False, "final_sigmas_type": "zero", "lambda_min_clipped": -float("inf"),
            "prediction_type": "epsilon"}  # diffusers' defaults; the betas default as in `common.alphas_cumprod`


def dpm_timesteps(num_train: int, num_steps: int, spacing: str, steps_offset: int = 0,
                  last: int | None = None) -> np.ndarray:
    """Inference timesteps, first to last, as `DPMSolverMultistepScheduler.set_timesteps` (`last`: after clipping)."""
    if num_steps > num_train:
        raise ValueError(f"{num_steps} inference steps > {num_train} training timesteps")
    last = num_train if last is None else last
    if spacing == "linspace":
        return np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (num_steps + 1)
        return (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -num_train / num_steps).round().astype(np.int64) - 1
    raise ValueError(f"unsupported timestep_spacing {spacing!r}: use 'leading', 'trailing' or 'linspace'")


def _update(order: int, heun: bool, lam: np.ndarray, alpha: np.ndarray, sigma: np.ndarray, i: int) -> np.ndarray:
    """(4,) float64 coefficients of [x, m0, m1, m2] for step i, from diffusers' float32 update formulas."""
    t, s0, s1, s2 = i + 1, i, i - 1, i - 2
    h = lam[t] - lam[s0]
    em1 = np.exp(-h) - np.float32(1.0)                      # exp(-h) - 1
    a_ = alpha[t] * em1                                     # the D0 weight, negated
    b_ = alpha[t] * (em1 / h + np.float32(1.0))             # Heun / third-order D1 weight
    d0 = np.array([1.0, 0, 0])
    if order == 1:
        return np.concatenate([[sigma[t] / sigma[s0]], -a_ * d0])
    r0 = (lam[s0] - lam[s1]) / h
    d1_0 = (np.float32(1.0) / r0) * np.array([1.0, -1, 0])  # D1_0 = (m0 - m1) / r0
    if order == 2:
        m = -a_ * d0 + (b_ * d1_0 if heun else -(np.float32(0.5) * a_) * d1_0)
        return np.concatenate([[sigma[t] / sigma[s0]], m])
    r1 = (lam[s1] - lam[s2]) / h
    d1_1 = (np.float32(1.0) / r1) * np.array([0, 1.0, -1])  # D1_1 = (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (np.float32(1.0) / (r0 + r1)) * (d1_0 - d1_1)
    c_ = alpha[t] * ((em1 + h) / h ** 2 - np.float32(0.5))
    return np.concatenate([[sigma[t] / sigma[s0]], -a_ * d0 + b_ * d1 - c_ * d2])


@dataclass(frozen=True)
class DPMSolverMultistep:
    """A DPM-Solver++ sampler for a fixed number of steps. `step` is pure and takes a traced step index."""
    config: Mapping
    num_inference_steps: int

    def __post_init__(self):
        c = self.config
        unknown = set(c) - KEYS - set(NEUTRAL) - INERT
        if unknown:
            raise ValueError(f"unknown DPM-Solver++ settings: {sorted(unknown)}")
        for k, neutral in NEUTRAL.items():
            v = c.get(k, neutral)
            if (v is not None) if neutral is None else (v != neutral):
                raise NotImplementedError(f"DPM-Solver++ does not support {k}={v!r} (only {neutral!r})")
        for k, allowed in CHOICES.items():
            if self.get(k) not in allowed:
                raise NotImplementedError(f"DPM-Solver++ does not support {k}={self.get(k)!r}: use one of {allowed}")

    def get(self, key: str):
        return self.config.get(key, DEFAULTS.get(key))

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """(T,) float32; with zero terminal SNR the last is 2**-24, not 0, so its sigma stays finite (as diffusers)."""
        ac = alphas_cumprod(dict(self.config))
        if self.config.get("rescale_betas_zero_snr", False):
            ac[-1] = 2.0 ** -24
        return ac

    @cached_property
    def timesteps(self) -> np.ndarray:
        ac = self.alphas_cumprod
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))  # (T,) log-SNR / 2, decreasing
        last = len(ac) - int(np.searchsorted(lam[::-1], self.get("lambda_min_clipped")))
        return dpm_timesteps(self.get("num_train_timesteps"), self.num_inference_steps, self.get("timestep_spacing"),
                             self.get("steps_offset"), last)

    @cached_property
    def sigmas(self) -> np.ndarray:
        """(N + 1,) float32 VE sigmas sqrt((1 - a) / a) at the timesteps, then the final one (0 or the smallest)."""
        ac = self.alphas_cumprod
        final = ((1 - ac[0]) / ac[0]) ** 0.5 if self.get("final_sigmas_type") == "sigma_min" else 0.0
        return np.concatenate([(((1 - ac) / ac) ** 0.5)[self.timesteps], [final]]).astype(np.float32)

    @cached_property
    def orders(self) -> np.ndarray:
        """(N,) the solver order each step uses: lower at the start (no history yet) and, if asked, at the end."""
        n, order = len(self.timesteps), self.get("solver_order")
        low = self.get("lower_order_final") and n < 15
        out = []
        for i in range(n):
            final = i == n - 1 and (self.get("euler_at_final") or low or self.get("final_sigmas_type") == "zero")
            out.append(1 if order == 1 or i < 1 or final else 2 if order == 2 or i < 2 or (i == n - 2 and low) else 3)
        return np.array(out)

    @cached_property
    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """alpha_t, sigma_t (N + 1,) of the VP process and the update coefficients (N, 4), float32."""
        s = self.sigmas
        alpha = np.float32(1.0) / (s ** 2 + np.float32(1.0)) ** 0.5
        sigma = s * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at a zero final sigma (only ever a first-order step)
        heun = self.get("solver_type") == "heun"
        coef = np.stack([_update(int(o), heun, lam, alpha, sigma, i) for i, o in enumerate(self.orders)])
        return alpha, sigma, coef.astype(np.float32)

    init_noise_sigma = 1.0

    def init_solver_state(self, sample: jax.Array) -> jax.Array:
        """(order - 1, *sample.shape) float32: the previous steps' x0 predictions, newest last."""
        return jnp.zeros((self.get("solver_order") - 1,) + sample.shape, jnp.float32)

    def step(self, solver: jax.Array, model_output: jax.Array, i: jax.Array, sample: jax.Array,
             key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x_t -> x_{t-1} at step index `i` (may be traced). Returns (prev_sample, solver state). Deterministic."""
        alpha, sigma, coef = (jnp.asarray(a) for a in self.tables)
        a, s, c = alpha[i], sigma[i], coef[i]                   # scalars, scalars, (4,)
        x, m = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        pt = self.get("prediction_type")
        x0 = (x - s * m) / a if pt == "epsilon" else a * x - s * m if pt == "v_prediction" else m
        prev = c[0] * x + c[1] * x0
        for k in range(solver.shape[0]):                        # m1 = solver[-1], m2 = solver[-2]
            prev = prev + c[2 + k] * solver[-1 - k]
        history = jnp.concatenate([solver[1:], x0[None]]) if solver.shape[0] else solver
        return prev.astype(sample.dtype), history
