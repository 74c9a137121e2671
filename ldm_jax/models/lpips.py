"""LPIPS perceptual distance (VGG16 variant, ``lpips.LPIPS(net='vgg')``, version 0.1) in Flax.

distance(x0, x1) = sum_l mean_hw( w_l . (n(f_l(x0)) - n(f_l(x1)))^2 ), where f_l are the VGG16
activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the shifted/scaled input, n() unit-
normalises over channels and w_l are the learned 1x1 "linear" heads ``lin0..lin4`` (no bias).

The parameter tree mirrors torchvision's VGG16 and lpips' heads: ``features.N`` ->
``params['net']['features_N']``, ``lin0.model.1`` -> ``params['lin0']['model_1']``.
``ldm_jax.convert.lpips`` loads the published weights onto it (``load_lpips_params``), renaming
torchvision and ``lpips.LPIPS`` keys with the one table :data:`VGG16_FEATURE_SLICES`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.conv import conv_general_dilated

__all__ = [
    "LPIPS",
    "VGG16Features",
    "VGG16_FEATURE_SLICES",
]

# torchvision ``vgg16().features`` index of each 3x3 conv -> the lpips slice holding it
# (slice k ends at the k-th tap: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_FEATURE_SLICES: dict[int, int] = {
    0: 1, 2: 1,
    5: 2, 7: 2,
    10: 3, 12: 3, 14: 3,
    17: 4, 19: 4, 21: 4,
    24: 5, 26: 5, 28: 5,
}
# Max-pools sit at features.4, 9, 16, 23, i.e. at the start of slices 2..5.
_CHANNELS = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256,
             17: 512, 19: 512, 21: 512, 24: 512, 26: 512, 28: 512}
TAP_CHANNELS = (64, 128, 256, 512, 512)

# ScalingLayer constants of lpips v0.1 (ImageNet statistics mapped to [-1, 1] inputs).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """torchvision VGG16 ``features`` up to relu5_3, returning the 5 LPIPS taps (NHWC)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        taps = []
        for s in range(1, 6):
            if s > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for idx in (i for i, sl in VGG16_FEATURE_SLICES.items() if sl == s):
                x = nn.Conv(_CHANNELS[idx], (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            conv_general_dilated=conv_general_dilated,
                            param_dtype=self.param_dtype, name=f"features_{idx}")(x)
                x = nn.relu(x)
            taps.append(x)
        return taps


class _LinLayer(nn.Module):
    """lpips ``NetLinLayer``: (dropout at index 0, identity at eval) + 1x1 conv to 1 channel, no bias."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Conv(1, (1, 1), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="model_1")(x)


def _normalize(feat, eps=1e-10):
    """feat / (||feat||_channels + eps), with a gradient that stays finite where the norm is 0."""
    sq = jnp.sum(jnp.square(feat), axis=-1, keepdims=True)
    pos = sq > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    return feat / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS-VGG distance. ``apply(params, x0, x1)`` with NHWC images in [-1, 1] -> [B] distances.

    Computation runs in ``dtype``; the channel normalisation and spatial means run in float32.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x0, x1):
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two NHWC RGB images of one shape, got {x0.shape} and {x1.shape}")
        shift = jnp.asarray(_SHIFT, jnp.float32)
        scale = jnp.asarray(_SCALE, jnp.float32)
        b = x0.shape[0]
        # Both images go through VGG as one batch.
        x = (jnp.concatenate([x0, x1], axis=0).astype(jnp.float32) - shift) / scale
        taps = VGG16Features(self.dtype, self.param_dtype, name="net")(x.astype(self.dtype))
        total = jnp.zeros((b,), jnp.float32)
        for k, feat in enumerate(taps):
            feat = _normalize(feat.astype(jnp.float32))
            diff = jnp.square(feat[:b] - feat[b:])
            lin = _LinLayer(self.dtype, self.param_dtype, name=f"lin{k}")(diff.astype(self.dtype))
            total = total + jnp.mean(lin.astype(jnp.float32), axis=(1, 2, 3))
        return total
