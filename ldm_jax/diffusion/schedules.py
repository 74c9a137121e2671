"""Discrete-time noise schedules (DDPM beta schedules) and the conversions between predictions.

A :class:`NoiseSchedule` holds ``betas``, ``alphas = 1 - betas`` and ``alphas_cumprod`` (``abar``)
for ``num_train_timesteps`` training steps, built exactly as the diffusers schedulers build them
(float32, same formulas), so sampler trajectories match diffusers to float rounding.

The forward process is ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``. All conversions
between the three parameterisations (``epsilon``, ``v_prediction``, ``sample``) live here.
Timestep arguments ``t`` are integer arrays: a scalar, or ``[B]`` (one per batch element, broadcast
over the remaining axes of ``x``).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@struct.dataclass
class NoiseSchedule:
    """Beta schedule of the diffusion process; arrays are float32 ``[num_train_timesteps]``."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    num_train_timesteps: int = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    rescale_betas_zero_snr: bool = struct.field(pytree_node=False, default=False)
    beta_schedule: str = struct.field(pytree_node=False, default="linear")


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` as PyTorch computes it on CPU: a
    float32 step, the first half counted up from ``start`` and the second half down from ``end``
    with fused multiply-adds (emulated in float64, exact for float32 operands)."""
    start, end = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start], np.float32)
    step = np.float64((end - start) / np.float32(n - 1))
    idx = np.arange(n)
    up = np.float64(start) + step * idx
    down = np.float64(end) - step * (n - idx - 1)
    return np.where(idx < n // 2, up, down).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """float32 cumulative product accumulated in float64, as PyTorch does on CPU."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule (diffusers' ``betas_for_alpha_bar``), float32."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32
    )


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales betas so the final step has SNR exactly 0 (Lin et al. 2023, Algorithm 1)."""
    alphas_cumprod = _cumprod_f32((1.0 - betas).astype(np.float32))
    sqrt_ab = np.sqrt(alphas_cumprod)
    first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).astype(np.float32)


def make_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
    prediction_type: str = "epsilon",
    **unused: Any,
) -> NoiseSchedule:
    """Builds a :class:`NoiseSchedule` from diffusers ``scheduler_config`` fields.

    Defaults are diffusers' defaults; unknown keys (``steps_offset``, ``clip_sample``,
    ``_class_name``, ...) are ignored so a whole ``scheduler_config.json`` can be passed.
    """
    del unused
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(
                f"trained_betas has shape {betas.shape}, expected ({num_train_timesteps},)"
            )
    elif beta_schedule == "linear":
        betas = _linspace_f32(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = _linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not one of {BETA_SCHEDULES}")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas = (1.0 - betas).astype(np.float32)
    alphas_cumprod = _cumprod_f32(alphas)
    return NoiseSchedule(
        betas=jnp.asarray(betas),
        alphas=jnp.asarray(alphas),
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        num_train_timesteps=int(num_train_timesteps),
        prediction_type=prediction_type,
        rescale_betas_zero_snr=bool(rescale_betas_zero_snr),
        beta_schedule="trained" if trained_betas is not None else beta_schedule,
    )


def _per_example(values: jax.Array, ndim: int) -> jax.Array:
    """Reshapes ``[B]`` per-example values to broadcast against a rank-``ndim`` array."""
    values = jnp.asarray(values, jnp.float32)
    if values.ndim == 0:
        return values
    if values.ndim != 1:
        raise ValueError(f"timesteps must be a scalar or [B], got shape {values.shape}")
    return values.reshape(values.shape + (1,) * (ndim - 1))


def _abar(sched: NoiseSchedule, t, ndim: int) -> jax.Array:
    return _per_example(sched.alphas_cumprod[jnp.asarray(t, jnp.int32)], ndim)


def x0_eps_from_output(prediction_type: str, sample, model_output, alpha_prod_t):
    """Returns ``(x0, eps)`` implied by a model output at noise level ``abar = alpha_prod_t``.

    Formulas (and their float32 evaluation order) are those of diffusers' DDIM scheduler.
    """
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        eps = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    return x0, eps


def predict_x0(sched: NoiseSchedule, x_t, t, model_output):
    """Clean-sample estimate from a model output at integer timestep(s) ``t``."""
    return x0_eps_from_output(sched.prediction_type, x_t, model_output, _abar(sched, t, x_t.ndim))[0]


def predict_eps(sched: NoiseSchedule, x_t, t, model_output):
    """Noise estimate from a model output at integer timestep(s) ``t``."""
    return x0_eps_from_output(sched.prediction_type, x_t, model_output, _abar(sched, t, x_t.ndim))[1]


def add_noise(sched: NoiseSchedule, x0, eps, t):
    """Forward process q(x_t | x0): ``sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``."""
    abar = _abar(sched, t, x0.ndim)
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * eps


def v_target(sched: NoiseSchedule, x0, eps, t):
    """Velocity ``v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0`` (diffusers' ``get_velocity``)."""
    abar = _abar(sched, t, x0.ndim)
    return abar**0.5 * eps - (1 - abar) ** 0.5 * x0


def training_target(sched: NoiseSchedule, x0, eps, t):
    """What the model should predict under ``sched.prediction_type``: eps, v or x0."""
    if sched.prediction_type == "epsilon":
        return eps
    if sched.prediction_type == "v_prediction":
        return v_target(sched, x0, eps, t)
    return x0


def snr(sched: NoiseSchedule, t) -> jax.Array:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at integer timestep(s) ``t`` (float32)."""
    abar = sched.alphas_cumprod[jnp.asarray(t, jnp.int32)]
    return abar / (1 - abar)


def min_snr_weights(sched: NoiseSchedule, t, gamma: float) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023) per timestep, for the loss on the target of
    ``sched.prediction_type``: ``min(snr, gamma) / snr`` (epsilon), ``/ (snr + 1)`` (v) or
    ``min(snr, gamma)`` (sample). ``gamma`` 0 or None: all ones."""
    s = snr(sched, t)
    if not gamma:
        return jnp.ones_like(s)
    clipped = jnp.minimum(s, gamma)
    if sched.prediction_type == "epsilon":
        return clipped / s
    if sched.prediction_type == "v_prediction":
        return clipped / (s + 1)
    return clipped
