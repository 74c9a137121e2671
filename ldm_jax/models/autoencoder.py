"""The first-stage autoencoders of latent diffusion: ``AutoencoderKL`` (SD's VAE) and ``VQModel``.

The module trees mirror diffusers' ``AutoencoderKL`` / ``VQModel`` name for name
(``encoder.down_blocks.{i}.resnets.{j}.conv1``, ``encoder.mid_block.attentions.0.to_q``,
``decoder.up_blocks.{i}.upsamplers.0.conv``, ``quant_conv``, ``quantize.embedding``, ...), so a
diffusers state dict maps onto the params through :func:`ldm_jax.convert.torch_flax.torch_to_flax`
with no table (``ldm_jax.convert.torch_flax.autoencoder_params_from_torch``). Attributes are
diffusers ``config.json`` names (:func:`vae_from_config`, :func:`vq_from_config` drop the others).
The resnets and resamplers are the shared ones of :mod:`ldm_jax.models.blocks`, with PyTorch's
default kernel init and GroupNorm in the module dtype (eps 1e-6).

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

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import dot_product_attention
from ldm_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm
from ldm_jax.models.config_file import read_model_config
from ldm_jax.models.remat import remat

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
]

# Path of the decoder's last conv kernel in the params (the "last layer" of the adaptive GAN weight).
LAST_LAYER = ("decoder", "conv_out", "kernel")

# PyTorch's default Conv/Linear weight init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
_TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# GroupNorm eps of every norm in the autoencoders (diffusers' default).
_NORM_EPS = 1e-6
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


def _conv(features, kernel, dtype, param_dtype, name):
    return conv(features, kernel, dtype, param_dtype, name, kernel_init=_TORCH_KERNEL_INIT)


@dataclasses.dataclass(frozen=True)
class _LayerSpec:
    """Settings every resnet and attention inside an encoder/decoder shares."""

    groups: int
    dtype: Any
    param_dtype: Any
    attention_impl: str
    remat: str | bool

    def resnet(self, out_channels: int, name: str) -> nn.Module:
        """A resnet without time embedding, PyTorch kernel init, GroupNorm in ``dtype``."""
        cls = remat(ResnetBlock2D, self.remat)
        return cls(out_channels, self.groups, _NORM_EPS, kernel_init=_TORCH_KERNEL_INIT, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)


class VAEAttention(nn.Module):
    """Single-head spatial self-attention with a residual (diffusers ``Attention`` of the VAE mid block)."""

    channels: int
    groups: int = 32
    eps: float = _NORM_EPS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "group_norm")(x)
        h = h.reshape(b, hh * ww, c)

        def dense(name):
            return nn.Dense(self.channels, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=_TORCH_KERNEL_INIT, name=name)

        q, k, v = (dense(n)(h)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))  # [B, L, 1, C]
        h = dot_product_attention(q, k, v, impl=self.attention_impl, upcast=True)[:, :, 0, :]
        h = dense("to_out_0")(h)
        return x + h.reshape(b, hh, ww, c)


class UNetMidBlock2D(nn.Module):
    """resnets_0 -> attentions_0 (if ``add_attention``) -> resnets_1 at the lowest resolution."""

    channels: int
    spec: _LayerSpec
    add_attention: bool = True

    @nn.compact
    def __call__(self, x):
        s = self.spec
        x = s.resnet(self.channels, "resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.channels, s.groups, dtype=s.dtype, param_dtype=s.param_dtype,
                             attention_impl=s.attention_impl, name="attentions_0")(x)
        return s.resnet(self.channels, "resnets_1")(x)


class _ResnetStack(nn.Module):
    """``num_layers`` resnets to ``out_channels`` (``resnets_{j}``), then the subclass's resampler if
    ``resample``: the one structure of diffusers' ``DownEncoderBlock2D`` and ``UpDecoderBlock2D``."""

    out_channels: int
    num_layers: int
    spec: _LayerSpec
    resample: bool = True

    def resampler(self, **kw) -> nn.Module:
        raise NotImplementedError

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = self.spec.resnet(self.out_channels, f"resnets_{j}")(x)
        if self.resample:
            x = self.resampler(kernel_init=_TORCH_KERNEL_INIT, dtype=self.spec.dtype,
                               param_dtype=self.spec.param_dtype)(x)
        return x


class DownEncoderBlock2D(_ResnetStack):
    """The resnets, then ``downsamplers_0`` (stride 2, LDM padding) if ``resample``."""

    def resampler(self, **kw) -> nn.Module:
        return Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)


class UpDecoderBlock2D(_ResnetStack):
    """The resnets, then ``upsamplers_0`` (nearest x2, conv) if ``resample``."""

    def resampler(self, **kw) -> nn.Module:
        return Upsample2D(self.out_channels, name="upsamplers_0", **kw)


class _Arch(nn.Module):
    """The architecture fields (diffusers ``config.json`` names) of the autoencoders, which pass
    them on to their :class:`Encoder` and :class:`Decoder`."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"
    gradient_checkpointing: str | bool = False  # a policy of ldm_jax.models.remat


class _Coder(_Arch):
    """What :class:`Encoder` and :class:`Decoder` share: the level blocks, ``mid_block`` and the
    output head (``conv_norm_out`` -> SiLU -> ``conv_out``)."""

    layers_per_block: int = 2  # diffusers' Encoder/Decoder default (the autoencoders' is 1)

    @nn.nowrap
    def _spec(self) -> _LayerSpec:
        return _LayerSpec(self.norm_num_groups, self.dtype, self.param_dtype, self.attention_impl,
                          self.gradient_checkpointing)

    def _conv3(self, features: int, name: str) -> nn.Module:
        return _conv(features, 3, self.dtype, self.param_dtype, name)

    def _levels(self, x, block: type[_ResnetStack], chans: Sequence[int], num_layers: int, prefix: str):
        """One ``block`` per level (``{prefix}_{i}``), resampling after every level but the last."""
        for i, c in enumerate(chans):
            x = block(c, num_layers, self._spec(), resample=i < len(chans) - 1, name=f"{prefix}_{i}")(x)
        return x

    def _mid_block(self, x, channels: int):
        return UNetMidBlock2D(channels, self._spec(), self.mid_block_add_attention, name="mid_block")(x)

    def _head(self, x, features: int):
        norm = group_norm(self.norm_num_groups, _NORM_EPS, self.dtype, self.param_dtype, "conv_norm_out")
        return self._conv3(features, "conv_out")(nn.silu(norm(x)))


class Encoder(_Coder):
    """``[B, H, W, in_channels]`` -> ``[B, H/f, W/f, out_channels * (2 if double_z else 1)]``."""

    double_z: bool = True

    @nn.compact
    def __call__(self, x):
        chans = tuple(self.block_out_channels)
        x = self._conv3(chans[0], "conv_in")(x)
        x = self._levels(x, DownEncoderBlock2D, chans, self.layers_per_block, "down_blocks")
        x = self._mid_block(x, chans[-1])
        return self._head(x, 2 * self.out_channels if self.double_z else self.out_channels)


class Decoder(_Coder):
    """``[B, h, w, in_channels]`` -> ``[B, h*f, w*f, out_channels]``; ``layers_per_block + 1`` resnets per level."""

    @nn.compact
    def __call__(self, z):
        chans = tuple(reversed(tuple(self.block_out_channels)))
        x = self._conv3(chans[0], "conv_in")(z)
        x = self._mid_block(x, chans[0])
        x = self._levels(x, UpDecoderBlock2D, chans, self.layers_per_block + 1, "up_blocks")
        return self._head(x, self.out_channels)


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


class _Autoencoder(_Arch):
    """What :class:`AutoencoderKL` and :class:`VQModel` share: the config fields beyond the
    architecture's, and the encoder/decoder pair."""

    down_block_types: Sequence[str] | None = None  # accepted for config.json; must be DownEncoderBlock2D
    up_block_types: Sequence[str] | None = None  # accepted for config.json; must be UpDecoderBlock2D
    act_fn: str = "silu"
    latent_channels: int = 4
    sample_size: Any = 32
    scaling_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(tuple(self.block_out_channels)) - 1)

    @nn.nowrap
    def _setup_coders(self, double_z: bool) -> None:
        """From ``setup``: check the config, then make ``self.encoder`` and ``self.decoder``."""
        _check_common(type(self).__name__, self)
        kw = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                  norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                  dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                  gradient_checkpointing=self.gradient_checkpointing)
        self.encoder = Encoder(self.in_channels, self.latent_channels, double_z=double_z, **kw)
        self.decoder = Decoder(self.latent_channels, self.out_channels, **kw)


# ----------------------------------------------------------------------------------------------
# KL autoencoder


class AutoencoderKL(_Autoencoder):
    """The KL-regularised autoencoder of LDM / Stable Diffusion (diffusers ``AutoencoderKL``).

    Methods (``model.apply({"params": p}, ..., method=AutoencoderKL.encode)``):
      encode: images ``[B, H, W, in_channels]`` in [-1, 1] -> :class:`DiagonalGaussian` over
        ``[B, H/f, W/f, latent_channels]`` (unscaled latents; multiply by ``scaling_factor``).
      decode: unscaled latents ``[B, h, w, latent_channels]`` -> images ``[B, h*f, w*f, out_channels]``.
      __call__: ``(x, key=None, sample_posterior=False)`` -> ``(reconstruction, posterior)``.

    ``scaling_factor``, ``shift_factor``, ``latents_mean/std``, ``force_upcast`` and ``sample_size``
    are carried for the pipelines; they do not change the network.
    """

    shift_factor: float | None = None
    latents_mean: Sequence[float] | None = None
    latents_std: Sequence[float] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def setup(self):
        self._setup_coders(double_z=True)
        lc = self.latent_channels
        self.quant_conv = (_conv(2 * lc, 1, self.dtype, self.param_dtype, None)
                           if self.use_quant_conv else None)
        self.post_quant_conv = (_conv(lc, 1, self.dtype, self.param_dtype, None)
                                if self.use_post_quant_conv else None)

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


class VQModel(_Autoencoder):
    """The VQ-regularised autoencoder of LDM (diffusers ``VQModel``).

    Methods (``model.apply({"params": p}, ..., method=VQModel.encode)``):
      encode: images ``[B, H, W, in_channels]`` -> pre-quantisation latents ``h [B, H/f, W/f, vq_embed_dim]``
        (what LDM's diffusion model works on, as diffusers).
      quantize_latents: ``h`` -> ``(z_q, info)`` (see :class:`VectorQuantizer`).
      decode: ``h`` -> images; quantises first unless ``force_not_quantize``.
      decode_code: code indices ``[B, h, w]`` -> images.
      __call__: ``x`` -> ``(reconstruction, info)``; ``info['codebook_loss']`` is the regulariser.
    """

    latent_channels: int = 3
    num_vq_embeddings: int = 256
    vq_embed_dim: int | None = None
    norm_type: str = "group"
    beta: float = 0.25
    legacy: bool = True

    def setup(self):
        self._setup_coders(double_z=False)
        if self.norm_type != "group":
            raise ValueError(f"VQModel: only norm_type 'group' is supported, got {self.norm_type!r}")
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
# Construction


def _from_config(cls, config, overrides):
    cfg = read_model_config(config)
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
