"""Samplers (diffusion "schedulers") behind one step interface, and their registry.

To add a sampler: write a :class:`Sampler` subclass (its own file) and add it to ``SAMPLERS``.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.diffusion.samplers.base import (
    TIMESTEP_SPACINGS,
    Sampler,
    SamplerState,
)
from ldm_jax.diffusion.samplers.ddim import DDIMSampler
from ldm_jax.diffusion.samplers.ddpm import DDPMSampler
from ldm_jax.diffusion.samplers.dpmpp import DPMSolverPlusPlus2MSampler
from ldm_jax.diffusion.samplers.euler import EulerAncestralSampler, EulerSampler
from ldm_jax.diffusion.samplers.pndm import PNDMSampler
from ldm_jax.diffusion.schedules import NoiseSchedule, make_schedule

SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "pndm": PNDMSampler,
    "dpmpp_2m": DPMSolverPlusPlus2MSampler,
    "euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
}
ALIASES: dict[str, str] = {"plms": "pndm", "dpm++": "dpmpp_2m", "dpmsolver++": "dpmpp_2m"}


def sampler_class(name: str) -> type[Sampler]:
    """The sampler class registered under ``name`` or one of its aliases."""
    key = ALIASES.get(name, name)
    if key not in SAMPLERS:
        valid = sorted(SAMPLERS) + sorted(ALIASES)
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(valid)}")
    return SAMPLERS[key]


def sampler_options(name: str) -> tuple[str, ...]:
    """Keyword options ``get_sampler`` accepts for sampler ``name``."""
    params = inspect.signature(sampler_class(name).create).parameters
    return tuple(p for p in params if p not in ("schedule", "num_inference_steps"))


def get_sampler(
    name: str,
    schedule: NoiseSchedule,
    num_inference_steps: int,
    timestep_spacing: str | None = None,
    steps_offset: int = 0,
    **opts: Any,
) -> Sampler:
    """Builds sampler ``name`` for ``num_inference_steps`` steps of ``schedule``.

    ``timestep_spacing`` is ``leading`` (plus ``steps_offset``), ``trailing`` or ``linspace``;
    ``None`` takes the diffusers default of that scheduler. Other options per sampler
    (``sampler_options(name)``), e.g. ``eta`` (ddim), ``use_karras_sigmas`` (dpmpp_2m, euler).
    """
    cls = sampler_class(name)
    unknown = sorted(set(opts) - set(sampler_options(name)))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for sampler {name!r}; accepted: {sampler_options(name)}"
        )
    return cls.create(
        schedule, num_inference_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset, **opts
    )


def get_sampler_from_config(
    name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int, **overrides: Any
) -> Sampler:
    """Schedule and sampler from a diffusers-style ``scheduler_config`` (e.g. ``config.scheduler``).

    Config keys the sampler accepts (``steps_offset``, ``set_alpha_to_one``, ...) are used;
    others are ignored. ``overrides`` win over the config.
    """
    schedule = make_schedule(**dict(scheduler_config))
    accepted = set(sampler_options(name))
    opts = {k: v for k, v in dict(scheduler_config).items() if k in accepted}
    opts.update(overrides)
    return get_sampler(name, schedule, num_inference_steps, **opts)


def denoise(
    sampler: Sampler,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    sample: jax.Array,
    rng: jax.Array | None = None,
    start: int = 0,
) -> jax.Array:
    """Runs ``sampler`` from step ``start`` to the end in a ``lax.fori_loop``.

    Args:
      model_fn: ``(scaled_sample, timestep) -> model_output`` (e.g. a CFG-wrapped UNet).
      sample: the initial sample, already scaled by ``init_noise_sigma`` (or noised by
        ``sampler.add_noise(x0, noise, start)`` for img2img).
      rng: PRNG key for stochastic samplers; step ``i`` uses ``normal(fold_in(rng, i))``.
    Returns:
      The final sample, shaped like ``sample``.
    """
    stochastic = sampler.stochastic
    if stochastic and rng is None:
        raise ValueError(f"{type(sampler).__name__} is stochastic: pass `rng`")

    def body(i, carry):
        x, state = carry
        out = model_fn(sampler.scale_model_input(state, x, i), sampler.timesteps[i])
        noise = None
        if stochastic:
            noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
        return sampler.step(state, out, x, i, noise)

    x, _ = lax.fori_loop(start, sampler.num_steps, body, (sample, sampler.init(sample)))
    return x


__all__ = [
    "ALIASES",
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPlusPlus2MSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "PNDMSampler",
    "Sampler",
    "SamplerState",
    "denoise",
    "get_sampler",
    "get_sampler_from_config",
    "sampler_class",
    "sampler_options",
]
