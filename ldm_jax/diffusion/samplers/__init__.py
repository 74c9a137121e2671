"""Samplers (diffusion "schedulers") behind one step interface, and their registry.

To add a sampler: write a :class:`Sampler` subclass (its own file) and add it to ``SAMPLERS``.
"""
from __future__ import annotations

from typing import Any, Mapping

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
    return ("timestep_spacing", "steps_offset") + sampler_class(name).option_names()


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
    unknown = sorted(set(opts) - set(cls.option_names()))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for sampler {name!r}; accepted: {cls.option_names()}")
    return cls.create(schedule, num_inference_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                      **opts)


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
    "get_sampler",
    "get_sampler_from_config",
    "sampler_class",
    "sampler_options",
]
