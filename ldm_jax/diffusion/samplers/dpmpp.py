"""DPM-Solver++(2M) (Lu et al. 2022): second-order multistep solver in data (x0) prediction."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from ldm_jax.diffusion.samplers.base import (
    Sampler,
    gather,
    karras_sigmas,
    sigma_alphas_cumprod,
    sigma_to_t,
)
from ldm_jax.diffusion.schedules import NoiseSchedule


def _dpm_timesteps(num_train: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """diffusers ``DPMSolverMultistepScheduler`` spacing (it drops the last of n + 1 points)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        step_ratio = num_train // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy() + steps_offset
    step_ratio = num_train / n
    return np.arange(num_train, 0, -step_ratio).round() - 1


def _as_timesteps(ts: np.ndarray) -> np.ndarray:
    """int32 when integral (the usual case), else float32 (Karras sigmas on a cosine schedule)."""
    return ts.astype(np.int32) if np.all(ts == np.round(ts)) else ts.astype(np.float32)


def _alpha_sigma(sigma):
    """VP ``(alpha_t, sigma_t)`` of the VE noise level ``sigma = sigma_t / alpha_t``."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


class DPMSolverPlusPlus2MSampler(Sampler):
    """diffusers ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``.

    ``sigmas`` (``[num_steps + 1]``, VE noise levels, last 0 or sigma_min) drive the solver.
    The first step is first order; so is the final one when ``final_sigmas_type="zero"``,
    ``euler_at_final``, or ``lower_order_final`` with fewer than 15 steps.
    """

    sigmas: jnp.ndarray
    solver_type: str = struct.field(pytree_node=False)
    final_lower_order: bool = struct.field(pytree_node=False)

    default_spacing = "linspace"
    buffers = {"x0": (2,)}

    @classmethod
    def _setup(cls, schedule: NoiseSchedule, n: int, spacing: str, steps_offset: int, use_karras_sigmas: bool = False,
               lower_order_final: bool = True, euler_at_final: bool = False, final_sigmas_type: str = "zero",
               solver_type: str = "midpoint") -> dict:
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        ts = _dpm_timesteps(schedule.num_train_timesteps, n, spacing, steps_offset)
        ac = sigma_alphas_cumprod(schedule)
        all_sigmas = ((1 - ac) / ac) ** 0.5
        log_sigmas = np.log(all_sigmas)
        if use_karras_sigmas:
            flipped = all_sigmas[::-1]
            sigmas = karras_sigmas(flipped[-1].item(), flipped[0].item(), n)
            ts = sigma_to_t(sigmas, log_sigmas)
            if schedule.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(all_sigmas)), all_sigmas)
        sigma_last = 0.0 if final_sigmas_type == "zero" else float(((1 - ac[0]) / ac[0]) ** 0.5)
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        final_lower = euler_at_final or (lower_order_final and len(ts) < 15) or final_sigmas_type == "zero"
        return dict(timesteps=jnp.asarray(_as_timesteps(ts)), init_noise_sigma=1.0, sigmas=jnp.asarray(sigmas),
                    solver_type=solver_type, final_lower_order=bool(final_lower))

    def step(self, state, model_output, sample, i, noise=None):
        del noise
        dtype = sample.dtype
        x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        i = jnp.asarray(i, jnp.int32)
        sigma_t, sigma_s0, sigma_s1 = (gather(self.sigmas, i + d) for d in (1, 0, -1))
        alpha_t, sigma_t = _alpha_sigma(sigma_t)
        alpha_s0, sigma_s0 = _alpha_sigma(sigma_s0)
        alpha_s1, sigma_s1 = _alpha_sigma(sigma_s1)

        if self.prediction_type == "epsilon":
            x0 = (x - sigma_s0 * out) / alpha_s0
        elif self.prediction_type == "v_prediction":
            x0 = alpha_s0 * x - sigma_s0 * out
        else:
            x0 = out
        history = jnp.concatenate([state.buffers["x0"][1:], x0[None]], axis=0)

        lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
        lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
        lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        phi = alpha_t * (jnp.exp(-h) - 1.0)
        first = (sigma_t / sigma_s0) * x - phi * x0

        m0, m1 = history[-1], history[-2]
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        if self.solver_type == "midpoint":
            second = (sigma_t / sigma_s0) * x - phi * d0 - 0.5 * phi * d1
        else:
            second = (sigma_t / sigma_s0) * x - phi * d0 + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1

        lower = state.count < 1
        if self.final_lower_order:
            lower = lower | (i == self.num_steps - 1)
        # The unused branch may hold inf/nan (h = inf at sigma 0); where() discards it.
        prev = jnp.where(lower, first, second)
        new_state = state.replace(count=state.count + 1, buffers={"x0": history})
        return prev.astype(dtype), new_state

    def add_noise(self, x0, noise, i):
        alpha_t, sigma_t = _alpha_sigma(gather(self.sigmas, i))
        return alpha_t * x0 + sigma_t * noise
