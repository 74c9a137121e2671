"""The first-stage autoencoders of latent diffusion: ``AutoencoderKL`` (SD's VAE) and ``VQModel``.

The module trees mirror diffusers' ``AutoencoderKL`` / ``VQModel`` name for name
(``encoder.down_blocks.{i}.resnets.{j}.conv1``, ``encoder.mid_block.attentions.0.to_q``,
``decoder.up_blocks.{i}.upsamplers.0.conv``, ``quant_conv``, ``quantize.embedding``, ...), so a
diffusers state dict maps onto the params through :func:`ldm_jax.convert.torch_flax.torch_to_flax`
with no table (:func:`autoencoder_params_from_torch`). Attributes are diffusers ``config.json``
names (:func:`vae_from_config`, :func:`vq_from_config` drop the others).

Layout is NHWC: images ``[B, H, W, C]`` in [-1, 1], latents ``[B, H/f, W/f, latent_channels]``
with ``f = 2 ** (len(block_out_channels) - 1)`` (8 for SD).

Typical use::

    vae = vae_from_config(config.vae)
    posterior = vae.apply({"params": p}, images, method=AutoencoderKL.encode)
    latents = posterior.sample(key) * vae.scaling_factor
    images = vae.apply({"params": p}, latents / vae.scaling_factor, method=AutoencoderKL.decode)

The adaptive GAN weight of the LDM loss differentiates through the decoder's last conv, whose
kernel is ``params['decoder']['conv_out']['kernel']`` (:data:`LAST_LAYER`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ldm_jax.convert.torch_flax import torch_to_flax
from ldm_jax.models.attention import dot_product_attention
from ldm_jax.models.conv import conv_general_dilated
from ldm_jax.models.norm import GroupNorm

__all__ = [
    "LAST_LAYER",
    "DiagonalGaussian",
    "ResnetBlock2D",
    "Downsample2D",
    "Upsample2D",
    "VAEAttention",
    "UNetMidBlock2D",
    "DownEncoderBlock2D",
    "UpDecoderBlock2D",
    "Encoder",
    "Decoder",
    "AutoencoderKL",
    "VectorQuantizer",
    "VQModel",
    "codebook_perplexity",
    "vae_from_config",
    "vq_from_config",
    "autoencoder_params_from_torch",
]

# Path of the decoder's last conv kernel in the params (the "last layer" of the adaptive GAN weight).
LAST_LAYER = ("decoder", "conv_out", "kernel")

# PyTorch's default Conv/Linear weight init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
_TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_ACT_FNS = ("silu", "swish")


# ----------------------------------------------------------------------------------------------
# Posterior


@flax.struct.dataclass
class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) of the KL autoencoder (a pytree).

    ``mean``, ``logvar``: ``[B, h, w, C]``; ``logvar`` is clamped to [-30, 20] by :meth:`from_moments`.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """``moments [..., 2C]`` (mean then logvar on the last axis) -> posterior, logvar clamped."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """Reparameterised sample ``mean + std * N(0, 1)``, ``[B, h, w, C]``."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(self || other) (other defaults to N(0, I)) summed over H, W, C -> ``[B]`` (nats)."""
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum(
            jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
            - self.logvar + other.logvar, axis=axes)

    def nll(self, x: jax.Array, axes: Sequence[int] = (1, 2, 3)) -> jax.Array:
        """Negative log-likelihood of ``x`` under the Gaussian, summed over ``axes`` -> ``[B]`` (nats)."""
        return 0.5 * jnp.sum(
            math.log(2.0 * math.pi) + self.logvar + jnp.square(x - self.mean) / self.var, axis=tuple(axes))


# ----------------------------------------------------------------------------------------------
# Building blocks (diffusers names)


def _conv(features, kernel, dtype, param_dtype, name, stride=1, padding=None):
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   conv_general_dilated=conv_general_dilated, dtype=dtype, param_dtype=param_dtype, kernel_init=_TORCH_KERNEL_INIT, name=name)


def _group_norm(groups, dtype, param_dtype, name, eps=1e-6):
    # Two-pass variance: the decoder's activations get large, where E[x^2] - E[x]^2 loses precision.
    return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv3x3 twice plus a (1x1 conv when the width changes) skip; no time embedding."""

    in_channels: int
    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(self.groups, self.dtype, self.param_dtype, "norm1", self.eps)(x))
        h = _conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv1")(h)
        h = nn.silu(_group_norm(self.groups, self.dtype, self.param_dtype, "norm2", self.eps)(h))
        h = _conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv2")(h)
        if self.in_channels != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, self.param_dtype, "conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """3x3 stride-2 conv after zero padding (0 top/left, 1 bottom/right), as the LDM/SD encoder."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, self.param_dtype, "conv", stride=2, padding=0)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, self.param_dtype, "conv")(x)


class VAEAttention(nn.Module):
    """Single-head spatial self-attention with a residual (diffusers ``Attention`` of the VAE mid block)."""

    channels: int
    groups: int = 32
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _group_norm(self.groups, self.dtype, self.param_dtype, "group_norm", self.eps)(x)
        h = h.reshape(b, hh * ww, c)

        def dense(name):
            return nn.Dense(self.channels, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=_TORCH_KERNEL_INIT, name=name)

        q, k, v = (dense(n)(h)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))  # [B, L, 1, C]
        h = dot_product_attention(q, k, v, impl=self.attention_impl, upcast=True)[:, :, 0, :]
        h = dense("to_out_0")(h)
        return x + h.reshape(b, hh, ww, c)


class UNetMidBlock2D(nn.Module):
    """resnets_0 -> attentions_0 -> resnets_1 at the lowest resolution."""

    channels: int
    groups: int = 32
    add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(ResnetBlock2D) if self.gradient_checkpointing else ResnetBlock2D
        kw = dict(groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype)
        x = block(self.channels, self.channels, **kw, name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.channels, attention_impl=self.attention_impl, **kw, name="attentions_0")(x)
        return block(self.channels, self.channels, **kw, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    in_channels: int
    out_channels: int
    num_layers: int
    add_downsample: bool
    groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(ResnetBlock2D) if self.gradient_checkpointing else ResnetBlock2D
        for j in range(self.num_layers):
            cin = self.in_channels if j == 0 else self.out_channels
            x = block(cin, self.out_channels, self.groups, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, self.param_dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    in_channels: int
    out_channels: int
    num_layers: int
    add_upsample: bool
    groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(ResnetBlock2D) if self.gradient_checkpointing else ResnetBlock2D
        for j in range(self.num_layers):
            cin = self.in_channels if j == 0 else self.out_channels
            x = block(cin, self.out_channels, self.groups, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """``[B, H, W, in_channels]`` -> ``[B, H/f, W/f, out_channels * (2 if double_z else 1)]``."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    double_z: bool = True
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x):
        chans = tuple(self.block_out_channels)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(chans[0], 3, name="conv_in", **kw)(x)
        cout = chans[0]
        for i, c in enumerate(chans):
            cin, cout = cout, c
            x = DownEncoderBlock2D(cin, cout, self.layers_per_block, add_downsample=i < len(chans) - 1,
                                   groups=self.norm_num_groups, gradient_checkpointing=self.gradient_checkpointing,
                                   **kw, name=f"down_blocks_{i}")(x)
        x = UNetMidBlock2D(chans[-1], self.norm_num_groups, self.mid_block_add_attention,
                           attention_impl=self.attention_impl, gradient_checkpointing=self.gradient_checkpointing,
                           **kw, name="mid_block")(x)
        x = nn.silu(_group_norm(self.norm_num_groups, name="conv_norm_out", **kw)(x))
        return _conv(2 * self.out_channels if self.double_z else self.out_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """``[B, h, w, in_channels]`` -> ``[B, h*f, w*f, out_channels]``; ``layers_per_block + 1`` resnets per level."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, z):
        chans = tuple(reversed(tuple(self.block_out_channels)))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(chans[0], 3, name="conv_in", **kw)(z)
        x = UNetMidBlock2D(chans[0], self.norm_num_groups, self.mid_block_add_attention,
                           attention_impl=self.attention_impl, gradient_checkpointing=self.gradient_checkpointing,
                           **kw, name="mid_block")(x)
        cout = chans[0]
        for i, c in enumerate(chans):
            cin, cout = cout, c
            x = UpDecoderBlock2D(cin, cout, self.layers_per_block + 1, add_upsample=i < len(chans) - 1,
                                 groups=self.norm_num_groups, gradient_checkpointing=self.gradient_checkpointing,
                                 **kw, name=f"up_blocks_{i}")(x)
        x = nn.silu(_group_norm(self.norm_num_groups, name="conv_norm_out", **kw)(x))
        return _conv(self.out_channels, 3, name="conv_out", **kw)(x)


def _check_common(name, m):
    chans = tuple(m.block_out_channels)
    if not chans:
        raise ValueError(f"{name}: block_out_channels is empty")
    bad = [c for c in chans if c % m.norm_num_groups]
    if bad:
        raise ValueError(f"{name}: block_out_channels {chans} must all be multiples of norm_num_groups "
                         f"{m.norm_num_groups} (bad: {bad})")
    if m.act_fn not in _ACT_FNS:
        raise ValueError(f"{name}: only act_fn 'silu' is supported, got {m.act_fn!r}")
    for attr, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = getattr(m, attr)
        if types is None:
            continue
        if len(types) != len(chans):
            raise ValueError(f"{name}: {attr} has {len(types)} entries but block_out_channels has {len(chans)}")
        if any(t != allowed for t in types):
            raise ValueError(f"{name}: {attr} must all be {allowed!r}, got {tuple(types)}")


def _check_images(name, x, channels):
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{name} expects NHWC images [B, H, W, {channels}], got shape {x.shape}")


def _check_latents(name, z, channels):
    if z.ndim != 4 or z.shape[-1] != channels:
        raise ValueError(f"{name} expects NHWC latents [B, h, w, {channels}], got shape {z.shape}")


# ----------------------------------------------------------------------------------------------
# KL autoencoder


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of LDM / Stable Diffusion (diffusers ``AutoencoderKL``).

    Methods (``model.apply({"params": p}, ..., method=AutoencoderKL.encode)``):
      encode: images ``[B, H, W, in_channels]`` in [-1, 1] -> :class:`DiagonalGaussian` over
        ``[B, H/f, W/f, latent_channels]`` (unscaled latents; multiply by ``scaling_factor``).
      decode: unscaled latents ``[B, h, w, latent_channels]`` -> images ``[B, h*f, w*f, out_channels]``.
      __call__: ``(x, key=None, sample_posterior=False)`` -> ``(reconstruction, posterior)``.

    ``scaling_factor``, ``shift_factor``, ``latents_mean/std``, ``force_upcast`` and ``sample_size``
    are carried for the pipelines; they do not change the network.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] | None = None  # accepted for config.json; must be DownEncoderBlock2D
    up_block_types: Sequence[str] | None = None  # accepted for config.json; must be UpDecoderBlock2D
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: Sequence[float] | None = None
    latents_std: Sequence[float] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"
    gradient_checkpointing: bool = False

    def setup(self):
        _check_common("AutoencoderKL", self)
        kw = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                  norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                  dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                  gradient_checkpointing=self.gradient_checkpointing)
        self.encoder = Encoder(self.in_channels, self.latent_channels, double_z=True, **kw)
        self.decoder = Decoder(self.latent_channels, self.out_channels, **kw)
        lc = self.latent_channels
        self.quant_conv = (_conv(2 * lc, 1, self.dtype, self.param_dtype, None)
                           if self.use_quant_conv else None)
        self.post_quant_conv = (_conv(lc, 1, self.dtype, self.param_dtype, None)
                                if self.use_post_quant_conv else None)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(tuple(self.block_out_channels)) - 1)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images ``[B, H, W, C]`` in [-1, 1] (H, W multiples of the downsample factor) -> posterior."""
        _check_images("AutoencoderKL.encode", x, self.in_channels)
        f = self.downsample_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"AutoencoderKL.encode: image size {x.shape[1:3]} is not a multiple of the "
                             f"downsample factor {f}")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents ``[B, h, w, latent_channels]`` -> images ``[B, h*f, w*f, out_channels]``."""
        _check_latents("AutoencoderKL.decode", z, self.latent_channels)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None, sample_posterior: bool = False):
        """``x [B, H, W, C]`` -> ``(reconstruction [B, H, W, out_channels], posterior)``.

        ``sample_posterior=True`` decodes ``posterior.sample(key)`` (training), else the mean.
        """
        if sample_posterior and key is None:
            raise ValueError("AutoencoderKL: sample_posterior=True needs a PRNG key")
        posterior = self.encode(x)
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


# ----------------------------------------------------------------------------------------------
# VQ autoencoder


def codebook_perplexity(indices: jax.Array, num_codes: int) -> jax.Array:
    """exp(entropy) of the code histogram of ``indices`` (any shape, ints in [0, num_codes)).

    Equals ``num_codes`` for a uniform assignment and 1 when one code is used (LDM's formula).
    """
    probs = jnp.mean(jax.nn.one_hot(indices.reshape(-1), num_codes, dtype=jnp.float32), axis=0)
    return jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with straight-through gradients (LDM/diffusers ``VectorQuantizer``).

    ``z [B, h, w, D]`` -> ``(z_q [B, h, w, D], info)``; ``z_q`` carries ``z``'s gradient (straight through).
    ``info``: ``codebook_loss`` (scalar; LDM's legacy form ``mean((sg[z_q] - z)^2) + beta *
    mean((z_q - sg[z])^2)``), ``indices [B, h, w]`` int32, ``perplexity`` (exp entropy of the code
    histogram of this batch), ``usage`` (fraction of codes used in this batch).
    """

    n_e: int
    vq_embed_dim: int
    beta: float = 0.25
    legacy: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embedding = nn.Embed(
            self.n_e, self.vq_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=_uniform_init(1.0 / self.n_e))

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Code indices ``[...]`` -> codebook vectors ``[..., D]``."""
        return self.embedding(indices)

    def nearest(self, z: jax.Array) -> jax.Array:
        """Index of the nearest code (Euclidean) for every vector of ``z [..., D]`` -> ``[...]`` int32."""
        codebook = self.embedding.embedding.astype(jnp.float32)
        flat = z.reshape(-1, self.vq_embed_dim).astype(jnp.float32)
        d = (jnp.sum(flat ** 2, axis=1, keepdims=True) - 2.0 * flat @ codebook.T
             + jnp.sum(codebook ** 2, axis=1)[None])
        return jnp.argmin(d, axis=1).astype(jnp.int32).reshape(z.shape[:-1])

    def __call__(self, z: jax.Array):
        if z.shape[-1] != self.vq_embed_dim:
            raise ValueError(f"VectorQuantizer expects [..., {self.vq_embed_dim}] vectors, got shape {z.shape}")
        indices = self.nearest(z)
        z_q = self.lookup(indices).astype(z.dtype)
        sg = jax.lax.stop_gradient
        commit = jnp.mean(jnp.square(sg(z_q) - z).astype(jnp.float32))
        codebook = jnp.mean(jnp.square(z_q - sg(z)).astype(jnp.float32))
        # legacy=True keeps LDM's original placement of beta (on the codebook term).
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z + sg(z_q - z)
        used = jnp.zeros((self.n_e,), bool).at[indices.reshape(-1)].set(True)
        info = dict(codebook_loss=loss, indices=indices,
                    perplexity=codebook_perplexity(indices, self.n_e),
                    usage=jnp.mean(used.astype(jnp.float32)))
        return z_q, info


def _uniform_init(limit):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)
    return init


class VQModel(nn.Module):
    """The VQ-regularised autoencoder of LDM (diffusers ``VQModel``).

    Methods (``model.apply({"params": p}, ..., method=VQModel.encode)``):
      encode: images ``[B, H, W, in_channels]`` -> pre-quantisation latents ``h [B, H/f, W/f, vq_embed_dim]``
        (what LDM's diffusion model works on, as diffusers).
      quantize_latents: ``h`` -> ``(z_q, info)`` (see :class:`VectorQuantizer`).
      decode: ``h`` -> images; quantises first unless ``force_not_quantize``.
      decode_code: code indices ``[B, h, w]`` -> images.
      __call__: ``x`` -> ``(reconstruction, info)``; ``info['codebook_loss']`` is the regulariser.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] | None = None
    up_block_types: Sequence[str] | None = None
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 3
    sample_size: Any = 32
    num_vq_embeddings: int = 256
    norm_num_groups: int = 32
    vq_embed_dim: int | None = None
    scaling_factor: float = 0.18215
    norm_type: str = "group"
    mid_block_add_attention: bool = True
    beta: float = 0.25
    legacy: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"
    gradient_checkpointing: bool = False

    def setup(self):
        _check_common("VQModel", self)
        if self.norm_type != "group":
            raise ValueError(f"VQModel: only norm_type 'group' is supported, got {self.norm_type!r}")
        kw = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                  norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                  dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                  gradient_checkpointing=self.gradient_checkpointing)
        self.encoder = Encoder(self.in_channels, self.latent_channels, double_z=False, **kw)
        self.decoder = Decoder(self.latent_channels, self.out_channels, **kw)
        self.quant_conv = _conv(self.embed_dim, 1, self.dtype, self.param_dtype, None)
        self.quantize = VectorQuantizer(self.num_vq_embeddings, self.embed_dim, self.beta, self.legacy,
                                        self.dtype, self.param_dtype)
        self.post_quant_conv = _conv(self.latent_channels, 1, self.dtype, self.param_dtype, None)

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim if self.vq_embed_dim is not None else self.latent_channels

    def encode(self, x: jax.Array) -> jax.Array:
        """Images ``[B, H, W, C]`` in [-1, 1] -> pre-quantisation latents ``[B, H/f, W/f, vq_embed_dim]``."""
        _check_images("VQModel.encode", x, self.in_channels)
        return self.quant_conv(self.encoder(x))

    def quantize_latents(self, h: jax.Array):
        """``h [B, h, w, vq_embed_dim]`` -> ``(z_q, info)`` (straight-through, see :class:`VectorQuantizer`)."""
        _check_latents("VQModel.quantize_latents", h, self.embed_dim)
        return self.quantize(h)

    def decode(self, h: jax.Array, force_not_quantize: bool = False) -> jax.Array:
        """Latents ``[B, h, w, vq_embed_dim]`` -> images ``[B, h*f, w*f, out_channels]``."""
        _check_latents("VQModel.decode", h, self.embed_dim)
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: jax.Array) -> jax.Array:
        """Code indices ``[B, h, w]`` int -> images ``[B, h*f, w*f, out_channels]``."""
        if indices.ndim != 3 or not jnp.issubdtype(indices.dtype, jnp.integer):
            raise ValueError(f"VQModel.decode_code expects integer indices [B, h, w], got "
                             f"{indices.dtype} {indices.shape}")
        quant = self.quantize.lookup(indices).astype(self.dtype)
        return self.decoder(self.post_quant_conv(quant))

    def __call__(self, x: jax.Array):
        """``x [B, H, W, C]`` -> ``(reconstruction [B, H, W, out_channels], info)`` (info: see VectorQuantizer)."""
        z_q, info = self.quantize_latents(self.encode(x))
        return self.decoder(self.post_quant_conv(z_q)), info


# ----------------------------------------------------------------------------------------------
# Construction and weights


def _read_config(config):
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return dict(config)


def _from_config(cls, config, overrides):
    cfg = _read_config(config)
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    out = {}
    for k, v in cfg.items():
        if k in fields and not k.startswith("_"):
            out[k] = tuple(v) if isinstance(v, list) else v
    out.update(overrides)
    return cls(**out)


def vae_from_config(config: Mapping[str, Any] | str | os.PathLike, **overrides) -> AutoencoderKL:
    """Build an :class:`AutoencoderKL` from a config mapping, a diffusers ``config.json`` or its folder.

    Unknown keys (``_class_name``, ``_diffusers_version``, ...) are dropped, lists become tuples;
    ``overrides`` (``dtype=jnp.bfloat16``, ``attention_impl=...``) win.
    """
    return _from_config(AutoencoderKL, config, overrides)


def vq_from_config(config: Mapping[str, Any] | str | os.PathLike, **overrides) -> VQModel:
    """As :func:`vae_from_config`, for :class:`VQModel`."""
    return _from_config(VQModel, config, overrides)


def autoencoder_params_from_torch(state_dict: Mapping[str, Any], target: Mapping[str, Any], *,
                                  source: str = "autoencoder state dict", dtype: Any = None) -> dict:
    """Map a diffusers ``AutoencoderKL``/``VQModel`` state dict onto the params ``target``.

    ``target`` is the ``params`` collection (arrays or ``jax.eval_shape`` structs). Old diffusers
    checkpoints with 1x1-conv attention weights are squeezed by the mapping table. Raises
    ``WeightsError`` naming missing/unexpected keys.
    """
    return torch_to_flax(state_dict, target, source=source, dtype=dtype)
