"""Diffusion processes: noise schedules, samplers, the denoising loop (pure JAX, no model code)."""
from ldm_jax.diffusion.sampling import classifier_free_guidance, denoise, guided, pair_contexts
from ldm_jax.diffusion.samplers import (
    ALIASES,
    SAMPLERS,
    Sampler,
    SamplerState,
    get_sampler,
    get_sampler_from_config,
    sampler_class,
    sampler_options,
)
from ldm_jax.diffusion.schedules import (
    NoiseSchedule,
    add_noise,
    make_schedule,
    min_snr_weights,
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
    "classifier_free_guidance",
    "denoise",
    "guided",
    "pair_contexts",
    "get_sampler",
    "get_sampler_from_config",
    "sampler_class",
    "sampler_options",
    "NoiseSchedule",
    "add_noise",
    "make_schedule",
    "min_snr_weights",
    "predict_eps",
    "predict_x0",
    "snr",
    "training_target",
    "v_target",
    "x0_eps_from_output",
]
