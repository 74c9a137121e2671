"""PatchGAN discriminator of pix2pix / taming-transformers (``NLayerDiscriminator``), NHWC.

Layers mirror taming's ``main`` Sequential index for index (``main.0`` conv, ``main.2`` conv,
``main.3`` BatchNorm, ...), so params are named ``main_0``, ``main_2``, ``main_3``, ...
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.conv import conv_general_dilated

__all__ = ["NLayerDiscriminator"]


def _conv_init(key, shape, dtype=jnp.float32):
    return 0.02 * jax.random.normal(key, shape, dtype)  # taming weights_init: N(0, 0.02)


def _bn_scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)  # N(1, 0.02)


class NLayerDiscriminator(nn.Module):
    """``apply(vars, x [B,H,W,C], train=bool, mutable=['batch_stats'])`` -> patch logits [B,h,w,1].

    ``train=True`` normalises with batch statistics and updates the running averages in
    ``batch_stats`` (call with ``mutable=['batch_stats']``); ``train=False`` uses the running
    averages. 4x4 convs (stride 2, 2, .., 1, 1), padding 1; for 256 px and 3 layers -> 30x30 logits.
    """

    input_nc: int = 3
    ndf: int = 64
    n_layers: int = 3
    use_actnorm: bool = False  # taming option; only BatchNorm is implemented here
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        if self.use_actnorm:
            raise ValueError("NLayerDiscriminator: use_actnorm=True is not implemented (use BatchNorm)")
        if x.ndim != 4 or x.shape[-1] != self.input_nc:
            raise ValueError(f"NLayerDiscriminator expects NHWC input with {self.input_nc} channels, got {x.shape}")

        def conv(features, stride, idx, bias):
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                           conv_general_dilated=conv_general_dilated, use_bias=bias, kernel_init=_conv_init, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=f"main_{idx}")

        def norm(idx):
            # torch BatchNorm2d: momentum 0.1 (flax momentum 0.9), eps 1e-5; stats in float32.
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                scale_init=_bn_scale_init, dtype=jnp.float32,
                                param_dtype=self.param_dtype, name=f"main_{idx}")

        x = x.astype(self.dtype)
        x = nn.leaky_relu(conv(self.ndf, 2, 0, True)(x), 0.2)
        idx, mult = 2, 1
        for n in range(1, self.n_layers + 1):
            mult = min(2**n, 8)
            stride = 2 if n < self.n_layers else 1
            x = conv(self.ndf * mult, stride, idx, False)(x)  # BatchNorm follows: no bias
            x = norm(idx + 1)(x).astype(self.dtype)
            x = nn.leaky_relu(x, 0.2)
            idx += 3
        return conv(1, 1, idx, True)(x)
