"""Convolutional building blocks shared by the UNet and the autoencoders (diffusers names, NHWC).

One :class:`ResnetBlock2D`, :class:`Downsample2D` and :class:`Upsample2D` serve both models; the
fields carry what differs between them, and each model passes its own values so that its
parameters, initialisation and outputs stay those of its PyTorch original:

* conv kernel init: Flax's default in the UNet (``kernel_init=None``), PyTorch's default in the
  autoencoders (``ldm_jax.models.autoencoder._TORCH_KERNEL_INIT``);
* GroupNorm: computed and returned in float32 in the UNet (``norm_dtype=jnp.float32``, eps 1e-5),
  in the module dtype in the autoencoders (``norm_dtype=None``, eps 1e-6);
* time embedding: the UNet's resnets take one (``time_emb_proj``), the autoencoders' do not;
* downsampling padding: 1 on every side in the UNet, LDM's 0 top/left and 1 bottom/right in the
  autoencoder encoder (``padding=0``, as diffusers' ``Downsample2D(padding=0)``).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.conv import conv_general_dilated
from ldm_jax.models.norm import GroupNorm

__all__ = ["conv", "group_norm", "widen_rows", "ResnetBlock2D", "Downsample2D", "Upsample2D"]

Dtype = Any
Initializer = Callable[..., jax.Array]


def conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str | None, *, stride: int = 1,
         padding: int | None = None, kernel_init: Initializer | None = None) -> nn.Conv:
    """A ``kernel`` x ``kernel`` conv with ``padding`` on every side (default: size-preserving).

    ``kernel_init=None`` keeps Flax's default kernel initialiser.
    """
    pad = (kernel - 1) // 2 if padding is None else padding
    init = {} if kernel_init is None else {"kernel_init": kernel_init}
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   conv_general_dilated=conv_general_dilated, dtype=dtype, param_dtype=param_dtype, name=name,
                   **init)


def group_norm(groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> GroupNorm:
    """GroupNorm (two-pass float32 statistics, see :mod:`ldm_jax.models.norm`) returning ``dtype``."""
    return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def widen_rows(x: jax.Array, rows: int) -> jax.Array:
    """``[B, ...]`` -> ``[rows, ...]``, each row repeated ``rows / B`` times in place (row r <- r // k).

    The UNet runs the layers before its first cross-attention once per sample and widens to the
    context's rows there (see ``UNet2DConditionModel``). Repeating in place keeps each sample's
    rows on the device that holds the sample when the batch is sharded.
    """
    if x.shape[0] == rows:
        return x
    if rows % x.shape[0]:
        raise ValueError(f"cannot widen {x.shape[0]} rows to {rows}")
    return jnp.repeat(x, rows // x.shape[0], axis=0)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, plus a 1x1 ``conv_shortcut`` when the width changes.

    ``x`` [B, H, W, Cin] -> [B, H, W, out_channels] in ``dtype``. Given ``temb`` [B', T],
    ``time_emb_proj(silu(temb))`` is added between the convs, its rows widened to ``x``'s
    (:func:`widen_rows`); without one (the autoencoders) the block has no ``time_emb_proj``.
    ``norm_dtype`` is the GroupNorm output dtype (None: ``dtype``); ``kernel_init`` initialises the
    conv kernels (None: Flax's default).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    norm_dtype: Dtype | None = None
    kernel_init: Initializer | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        norm_dt = dt if self.norm_dtype is None else self.norm_dtype
        norm = lambda name: group_norm(self.groups, self.eps, norm_dt, pdt, name)  # noqa: E731
        conv_ = lambda k, name: conv(self.out_channels, k, dt, pdt, name, kernel_init=self.kernel_init)  # noqa: E731
        h = conv_(3, "conv1")(nn.silu(norm("norm1")(x)))
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=dt, param_dtype=pdt, name="time_emb_proj")(nn.silu(temb))
            h = h + widen_rows(t, h.shape[0])[:, None, None, :]
        h = conv_(3, "conv2")(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv_(1, "conv_shortcut")(x)
        return (x.astype(h.dtype) + h).astype(dt)


class Downsample2D(nn.Module):
    """3x3 stride-2 ``conv``: [B, H, W, C] -> [B, H/2, W/2, C] for even H, W.

    ``padding=1`` pads every side by 1 (the UNet; odd sizes round up); ``padding=0`` pads only the
    bottom and right by 1 before an unpadded conv (the LDM/SD autoencoder encoder).
    """

    channels: int
    padding: int = 1
    kernel_init: Initializer | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.channels, 3, self.dtype, self.param_dtype, "conv", stride=2, padding=self.padding,
                    kernel_init=self.kernel_init)(x)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    # PyTorch's "nearest" interpolation: src = floor(dst * n_in / n_out).
    return np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int32), n_in - 1)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to ``output_size``) then a 3x3 ``conv``: [B, H, W, C] -> [B, 2H, 2W, C]."""

    channels: int
    kernel_init: Initializer | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        _, h, w, _ = x.shape
        if output_size is None or tuple(output_size) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = jnp.take(x, _nearest_indices(h, output_size[0]), axis=1)
            x = jnp.take(x, _nearest_indices(w, output_size[1]), axis=2)
        return conv(self.channels, 3, self.dtype, self.param_dtype, "conv", kernel_init=self.kernel_init)(x)
