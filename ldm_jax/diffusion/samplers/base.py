"""The step interface shared by all samplers, and the timestep/sigma helpers they use.

A sampler is an immutable pytree (flax ``struct.PyTreeNode``): per-step arrays are leaves,
options are static fields. It is built once on the host by ``Cls.create(schedule,
num_inference_steps, ...)`` and then used inside ``jax.jit`` / ``lax.fori_loop``::

    state = sampler.init(x)
    def body(i, carry):                       # i is a traced int32 index into timesteps
        x, state = carry
        out = model(sampler.scale_model_input(state, x, i), sampler.timesteps[i])
        return sampler.step(state, out, x, i, noise=noise_i)
    x, _ = lax.fori_loop(start, sampler.num_steps, body, (x * sampler.init_noise_sigma, state))

``step`` never branches in Python on ``i`` or on the state; history buffers have fixed size.
Multistep samplers count their own steps in ``state.count`` (so warm-up works when a loop starts
at ``start > 0`` for img2img), while ``i`` always indexes the full ``timesteps`` array.
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ldm_jax.diffusion.schedules import NoiseSchedule

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@struct.dataclass
class SamplerState:
    """Per-trajectory sampler state: steps taken since ``init`` and fixed-size buffers."""

    count: jax.Array  # int32 scalar
    buffers: dict[str, jax.Array]


def check_steps(schedule: NoiseSchedule, num_inference_steps) -> int:
    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps:
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {n}")
    if n > schedule.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps ({n}) cannot exceed num_train_timesteps "
            f"({schedule.num_train_timesteps})"
        )
    return n


def check_spacing(timestep_spacing: str) -> str:
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing {timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")
    return timestep_spacing


def spaced_timesteps(num_train: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Descending float64 timesteps as diffusers' DDPM/DDIM/Euler ``set_timesteps`` compute them.

    ``linspace`` is left unrounded (Euler keeps fractional timesteps; the others round).
    """
    check_spacing(spacing)
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n)[::-1].copy()
    if spacing == "leading":
        step_ratio = num_train // n
        return (np.arange(0, n) * step_ratio).round()[::-1].astype(np.float64) + steps_offset
    step_ratio = num_train / n
    return np.round(np.arange(num_train, 0, -step_ratio)) - 1


def sigma_alphas_cumprod(schedule: NoiseSchedule) -> np.ndarray:
    """``alphas_cumprod`` for sigma-parameterised samplers: a zero terminal value (zero-SNR
    rescaling) is replaced by 2**-24 so that ``sigma = sqrt((1 - abar) / abar)`` stays finite,
    as in diffusers."""
    ac = np.array(schedule.alphas_cumprod, np.float32)
    if schedule.rescale_betas_zero_snr:
        ac[-1] = 2.0**-24
    return ac


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, descending, float64 ``[n]``."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of noise levels ``sigmas`` by log-sigma interpolation."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigmas.shape)


def gather(array: jax.Array, index) -> jax.Array:
    """``array[index]`` for a traced index, clamped into range (no wrap-around)."""
    index = jnp.clip(jnp.asarray(index, jnp.int32), 0, array.shape[0] - 1)
    return array[index]


class Sampler(struct.PyTreeNode):
    """Base class. Subclasses add their fields and implement ``create`` and ``step``.

    Attributes:
      schedule: the training noise schedule.
      timesteps: ``[num_steps]`` model timesteps, descending (int32; float32 for samplers that
        use fractional timesteps, as diffusers' Euler schedulers do).
      num_inference_steps: the requested number of steps (``num_steps`` may differ, e.g. PNDM).
      init_noise_sigma: multiply unit Gaussian initial latents by this.
    """

    schedule: NoiseSchedule
    timesteps: jax.Array
    num_inference_steps: int = struct.field(pytree_node=False)
    init_noise_sigma: float = struct.field(pytree_node=False)

    stochastic: ClassVar[bool] = False
    default_spacing: ClassVar[str] = "leading"
    # State buffers: name -> leading shape; each buffer is float32 ``leading + sample.shape``.
    buffers: ClassVar[dict[str, tuple[int, ...]]] = {}

    @classmethod
    def create(cls, schedule: NoiseSchedule, num_inference_steps: int, timestep_spacing: str | None = None,
               steps_offset: int = 0, **options: Any) -> "Sampler":
        """The sampler for ``num_inference_steps`` steps of ``schedule``.

        ``timestep_spacing`` is ``leading`` (plus ``steps_offset``), ``trailing`` or ``linspace``;
        None takes the diffusers default of this sampler. ``options``: :meth:`option_names`.
        """
        n = check_steps(schedule, num_inference_steps)
        spacing = check_spacing(timestep_spacing or cls.default_spacing)
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; accepted: {cls.option_names()}")
        fields = cls._setup(schedule, n, spacing, int(steps_offset), **options)
        return cls(schedule=schedule, num_inference_steps=n, **fields)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The keyword options of :meth:`create` besides the spacing (from :meth:`_setup`'s signature)."""
        params = list(inspect.signature(cls._setup).parameters)
        return tuple(params[4:])  # after schedule, n, spacing, steps_offset

    @classmethod
    def _setup(cls, schedule: NoiseSchedule, n: int, spacing: str, steps_offset: int) -> dict[str, Any]:
        """This sampler's fields (``timesteps``, ``init_noise_sigma``, its own) for ``n`` steps; its
        keyword arguments after ``steps_offset`` are its options."""
        raise NotImplementedError

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def num_steps(self) -> int:
        """Number of model evaluations (length of ``timesteps``)."""
        return self.timesteps.shape[0]

    def init(self, sample: jax.Array) -> SamplerState:
        """Fresh state for a trajectory of samples shaped like ``sample``."""
        buffers = {
            name: jnp.zeros(lead + tuple(sample.shape), jnp.float32)
            for name, lead in self.buffers.items()
        }
        return SamplerState(count=jnp.zeros((), jnp.int32), buffers=buffers)

    def scale_model_input(self, state: SamplerState, sample: jax.Array, i) -> jax.Array:
        """The UNet input at step ``i`` (identity except for sigma-space samplers)."""
        del state, i
        return sample

    def step(self, state, model_output, sample, i, noise=None):
        """One denoising step from ``timesteps[i]``; returns ``(prev_sample, new_state)``.

        ``noise`` (shaped like ``sample``) is the Gaussian noise stochastic samplers inject;
        deterministic samplers ignore it. Arithmetic is float32; the result has sample's dtype.
        """
        raise NotImplementedError

    def start_index(self, strength: float) -> int:
        """img2img/SDEdit: index into ``timesteps`` where denoising starts for ``strength``.

        ``int(strength * num_inference_steps)`` steps are run, as in diffusers' img2img.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        n = self.num_inference_steps
        init_timestep = min(int(n * strength), n)
        if init_timestep < 1:
            raise ValueError(
                f"strength {strength} with {n} steps leaves no denoising step; increase either"
            )
        return max(n - init_timestep, 0)

    def add_noise(self, x0: jax.Array, noise: jax.Array, i) -> jax.Array:
        """Noises clean ``x0`` to the level of ``timesteps[i]`` (img2img start latents)."""
        abar = gather(self.schedule.alphas_cumprod, gather(self.timesteps, i))
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise

    def _require_noise(self, noise):
        if noise is None:
            raise ValueError(f"{type(self).__name__} is stochastic: pass `noise` to step()")
        return jnp.asarray(noise, jnp.float32)
