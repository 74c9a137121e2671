"""The denoising loop and classifier-free guidance: one implementation for the sampling pipeline
and the training previews.

A model here is any ``(x [B, ...], t [B]) -> output [B, ...]``; with guidance the network is applied
once to ``k = 2`` context rows per sample, ``(unconditional, conditional)`` in that order, and
:func:`guided` combines the two outputs. Everything is traceable: the guidance scale, the rescale
factor, the start index and the PRNG key may be traced values, so changing them never recompiles.
The guidance scale and the key may also be one per sample (``[B]``): a sample's result then depends on
its own scale and key only, never on the other samples of its batch (what a server batching unrelated
requests needs).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.diffusion.samplers import Sampler

__all__ = ["pair_contexts", "classifier_free_guidance", "guided", "denoise", "per_row_keys", "row_normal"]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def pair_contexts(uncond: jax.Array, cond: jax.Array) -> jax.Array:
    """``uncond``, ``cond`` ``[B, L, D]`` -> ``[2B, L, D]``: rows ``2i, 2i+1`` are sample i's
    ``(unconditional, conditional)`` pair, the layout :func:`guided` and the UNet's context pairs use
    (each sample's rows stay together, on the device that holds the sample)."""
    if uncond.shape != cond.shape:
        raise ValueError(f"unconditional context {uncond.shape} and conditional context {cond.shape} differ")
    return jnp.stack([uncond, cond], axis=1).reshape((-1,) + cond.shape[1:])


def per_row_keys(rng) -> bool:
    """Whether ``rng`` holds one PRNG key per sample (typed keys ``[B]`` or raw ``uint32 [B, 2]``)."""
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    return rng.ndim == (1 if typed else 2)


def row_normal(rng, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal float32 ``shape``; with one key per sample (:func:`per_row_keys`), row ``i`` is
    drawn from key ``i`` alone."""
    if per_row_keys(rng):
        return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(rng)
    return jax.random.normal(rng, shape, jnp.float32)


def _per_sample(value, ndim: int):
    """A scalar, or ``[B]`` reshaped to broadcast over the other ``ndim - 1`` axes."""
    value = jnp.asarray(value, jnp.float32)
    return value.reshape(value.shape + (1,) * (ndim - 1)) if value.ndim == 1 else value


def classifier_free_guidance(uncond: jax.Array, cond: jax.Array, scale, rescale=0.0) -> jax.Array:
    """``uncond + scale * (cond - uncond)``, blended with its rescaled form (guidance rescale, Lin et
    al. 2023: the guided output's per-sample std matched to ``cond``'s) by ``rescale`` (0: none).
    ``scale`` and ``rescale``: scalars or one per sample."""
    scale, rescale = _per_sample(scale, cond.ndim), _per_sample(rescale, cond.ndim)
    out = uncond + scale * (cond - uncond)
    axes = tuple(range(1, cond.ndim))
    rescaled = out * (jnp.std(cond, axis=axes, keepdims=True) / jnp.std(out, axis=axes, keepdims=True))
    return rescale * rescaled + (1 - rescale) * out


def guided(apply_pairs: Callable[[jax.Array, jax.Array], jax.Array], scale, rescale=0.0) -> ModelFn:
    """A model ``(x [B, ...], t) -> output`` from ``apply_pairs(x [B, ...], t [B]) -> [2B, ...]``, which
    evaluates the network on each sample's ``(unconditional, conditional)`` context pair (rows
    ``2i, 2i+1``); ``t`` may be a scalar."""

    def model_fn(x, t):
        b = x.shape[0]
        out = apply_pairs(x, jnp.broadcast_to(t, (b,)))
        out = out.reshape((b, 2) + out.shape[1:])
        return classifier_free_guidance(out[:, 0], out[:, 1], scale, rescale)

    return model_fn


def denoise(sampler: Sampler, model_fn: ModelFn, sample: jax.Array, rng: jax.Array | None = None,
            start=0, after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> jax.Array:
    """Runs ``sampler`` from step ``start`` to the end in a ``lax.fori_loop``.

    Args:
      model_fn: ``(scaled_sample, timestep) -> model_output`` (e.g. :func:`guided`).
      sample: the initial sample, already scaled by ``init_noise_sigma`` (or noised by
        ``sampler.add_noise(x0, noise, start)`` for img2img).
      rng: PRNG key for stochastic samplers; step ``i`` uses ``normal(fold_in(rng, i))``. One key per
        sample (``[B]``): each sample's noise from its own key.
      start: first step (int or traced int32).
      after_step: ``(i, x) -> x`` applied after every step (e.g. inpainting's blending of the known
        region).
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
            step_key = jax.vmap(jax.random.fold_in, (0, None))(rng, i) if per_row_keys(rng) else jax.random.fold_in(rng, i)
            noise = row_normal(step_key, x.shape)
        x, state = sampler.step(state, out, x, i, noise)
        if after_step is not None:
            x = after_step(i, x)
        return x, state

    x, _ = lax.fori_loop(start, sampler.num_steps, body, (sample, sampler.init(sample)))
    return x
