"""Diffusion processes: noise schedules and samplers (pure JAX, no model code)."""
from ldm_jax.diffusion.samplers import (
    ALIASES,
    SAMPLERS,
    Sampler,
    SamplerState,
    denoise,
    get_sampler,
    get_sampler_from_config,
    sampler_class,
    sampler_options,
)
from ldm_jax.diffusion.schedules import (
    NoiseSchedule,
    add_noise,
    make_schedule,
    predict_eps,
    predict_x0,
    snr,
    training_target,
    v_target,
    x0_eps_from_output,
)

__all__ = [
    "ALIASES",
    "SAMPLERS",
    "Sampler",
    "SamplerState",
    "denoise",
    "get_sampler",
    "get_sampler_from_config",
    "sampler_class",
    "sampler_options",
    "NoiseSchedule",
    "add_noise",
    "make_schedule",
    "predict_eps",
    "predict_x0",
    "snr",
    "training_target",
    "v_target",
    "x0_eps_from_output",
]
