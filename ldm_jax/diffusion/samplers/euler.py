"""Euler and Euler-ancestral samplers in Karras et al.'s sigma (VE) parameterisation.

The sample lives in sigma space, ``x = x0 + sigma * eps`` (= the VP latent times
``sqrt(1 + sigma^2)``); the model sees ``x / sqrt(1 + sigma^2)``. Timesteps may be fractional
(float32), exactly as diffusers' Euler schedulers pass them to the UNet.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.samplers.base import (
    Sampler,
    gather,
    karras_sigmas,
    sigma_alphas_cumprod,
    sigma_to_t,
    spaced_timesteps,
)
from ldm_jax.diffusion.schedules import NoiseSchedule


def _euler_sigmas(schedule, n, spacing, steps_offset):
    """Timesteps (float32) and interpolated sigmas (float64) as diffusers' Euler schedulers."""
    ts = spaced_timesteps(schedule.num_train_timesteps, n, spacing, steps_offset).astype(np.float32)
    ac = sigma_alphas_cumprod(schedule)
    all_sigmas = ((1 - ac) / ac) ** 0.5
    sigmas = np.interp(ts, np.arange(0, len(all_sigmas)), all_sigmas)
    return ts, sigmas, all_sigmas


def _init_noise_sigma(sigmas: np.ndarray, spacing: str) -> float:
    max_sigma = np.float32(sigmas.max())
    if spacing in ("linspace", "trailing"):
        return float(max_sigma)
    return float((max_sigma**2 + np.float32(1)) ** np.float32(0.5))


def _sigma_fields(ts: np.ndarray, sigmas: np.ndarray, sigma_last: float, spacing: str) -> dict:
    """The fields of a sigma-space sampler: ``sigmas`` with the final level appended (float32)."""
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
    return dict(timesteps=jnp.asarray(ts), init_noise_sigma=_init_noise_sigma(sigmas, spacing), sigmas=jnp.asarray(sigmas))


class _SigmaSampler(Sampler):
    """Shared by Euler samplers: ``sigmas`` ``[num_steps + 1]`` float32, last 0 (or sigma_min)."""

    sigmas: jnp.ndarray

    default_spacing = "linspace"

    def scale_model_input(self, state, sample, i):
        del state
        sigma = gather(self.sigmas, i)
        return (sample.astype(jnp.float32) / (sigma**2 + 1) ** 0.5).astype(sample.dtype)

    def _x0(self, x, out, sigma):
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        return out

    def add_noise(self, x0, noise, i):
        return x0 + noise * gather(self.sigmas, i)


class EulerSampler(_SigmaSampler):
    """diffusers ``EulerDiscreteScheduler`` (no churn): deterministic Euler steps in sigma."""

    @classmethod
    def _setup(cls, schedule: NoiseSchedule, n: int, spacing: str, steps_offset: int, use_karras_sigmas: bool = False,
               final_sigmas_type: str = "zero") -> dict:
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        ts, sigmas, all_sigmas = _euler_sigmas(schedule, n, spacing, steps_offset)
        if use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), n)
            ts = sigma_to_t(sigmas, np.log(all_sigmas)).astype(np.float32)
        ac0 = sigma_alphas_cumprod(schedule)[0]
        sigma_last = 0.0 if final_sigmas_type == "zero" else ((1 - ac0) / ac0) ** 0.5
        return _sigma_fields(ts, sigmas, sigma_last, spacing)

    def step(self, state, model_output, sample, i, noise=None):
        del noise
        dtype = sample.dtype
        x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        sigma, sigma_next = gather(self.sigmas, i), gather(self.sigmas, jnp.asarray(i) + 1)
        derivative = (x - self._x0(x, out, sigma)) / sigma
        prev = x + derivative * (sigma_next - sigma)
        return prev.astype(dtype), state.replace(count=state.count + 1)


class EulerAncestralSampler(_SigmaSampler):
    """diffusers ``EulerAncestralDiscreteScheduler``: Euler step to ``sigma_down``, then fresh
    noise of std ``sigma_up`` (``sigma_down^2 + sigma_up^2 = sigma_next^2``)."""

    stochastic = True

    @classmethod
    def _setup(cls, schedule: NoiseSchedule, n: int, spacing: str, steps_offset: int) -> dict:
        if schedule.prediction_type == "sample":
            raise ValueError("euler_a supports prediction_type epsilon or v_prediction, not 'sample'")
        ts, sigmas, _ = _euler_sigmas(schedule, n, spacing, steps_offset)
        return _sigma_fields(ts, sigmas, 0.0, spacing)

    def step(self, state, model_output, sample, i, noise=None):
        noise = self._require_noise(noise)
        dtype = sample.dtype
        x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        sigma, sigma_to = gather(self.sigmas, i), gather(self.sigmas, jnp.asarray(i) + 1)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (x - self._x0(x, out, sigma)) / sigma
        prev = x + derivative * (sigma_down - sigma) + noise * sigma_up
        return prev.astype(dtype), state.replace(count=state.count + 1)
