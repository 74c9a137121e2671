"""The Stable Diffusion UNet (diffusers' ``UNet2DConditionModel``) in Flax.

The module tree mirrors diffusers name for name (``down_blocks_0/resnets_1/conv1`` <->
``down_blocks.0.resnets.1.conv1``), so PyTorch weights load through
:func:`ldm_jax.convert.torch_flax.torch_to_flax` with no per-model table. Arrays are NHWC.

Attributes of :class:`UNet2DConditionModel` are the diffusers ``config.json`` fields used by SD;
:func:`unet_from_config` builds the module from such a dict. The resnets and resamplers are the
shared ones of :mod:`ldm_jax.models.blocks`, with Flax's default kernel init and GroupNorm
computed in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import dot_product_attention
from ldm_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm, widen_rows
from ldm_jax.models.remat import remat

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)


def get_timestep_embedding(
    timesteps: jax.Array,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of ``timesteps`` [B] (any real values) -> float32 [B, embedding_dim].

    Same as diffusers ``get_timestep_embedding``: frequencies ``exp(-ln(max_period) * i /
    (half - freq_shift))``, order ``[sin, cos]`` or ``[cos, sin]`` when ``flip_sin_to_cos``.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {timesteps.shape}")
    half = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(emb), jnp.cos(emb)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if embedding_dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _f32_group_norm(groups: int, eps: float, param_dtype: Dtype, name: str) -> nn.Module:
    # The UNet's GroupNorms compute and return float32; the next layer casts to `dtype`.
    return group_norm(groups, eps, jnp.float32, param_dtype, name)


class TimestepEmbedding(nn.Module):
    """The UNet's ``time_embedding``: ``linear_1 -> silu -> linear_2``, [B, Cin] -> [B, features]
    (the sinusoidal embedding of the timesteps in, the vector every resnet adds out)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        x = nn.silu(x)
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static settings of an attention layer: ``heads`` of width ``dim_head``, float32 softmax
    (``upcast``), kernel choice and query chunking (see :func:`dot_product_attention`)."""

    heads: int
    dim_head: int
    upcast: bool = False
    impl: str = "auto"
    chunk_size: int | None = None
    ignore_zero_context: bool = False  # cross-attention: no weight on all-zero context vectors


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v and ``to_out_0``: [B, L, C] (context [B, S, Cctx]) -> [B, L, C]."""

    spec: AttentionSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        s = self.spec
        inner = s.heads * s.dim_head
        context = x if context is None else context
        b, l, c = x.shape
        dense = lambda features, name, **kw: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], s.heads, s.dim_head)  # noqa: E731
        q = dense(inner, "to_q", use_bias=False)(x)
        k = dense(inner, "to_k", use_bias=False)(context)
        v = dense(inner, "to_v", use_bias=False)(context)
        mask = None
        if s.ignore_zero_context and context is not x:  # [B, 1, 1, S]: the context's non-zero vectors
            mask = jnp.any(context != 0, axis=-1)[:, None, None, :]
        out = dot_product_attention(split(q), split(k), split(v), mask=mask, impl=s.impl, upcast=s.upcast,
                                    chunk_size=s.chunk_size)
        return dense(c, "to_out_0")(out.reshape(b, l, inner))


class GEGLU(nn.Module):
    """``proj`` to 2 * features, then ``hidden * gelu(gate)`` (exact gelu)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """``net_0`` (GEGLU, x4 width) -> ``net_2`` (Dense back to the input width)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual. [B, L, C]."""

    attention: AttentionSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)  # noqa: E731
        x = x + Attention(self.attention, name="attn1", **kw)(norm("norm1")(x))
        x = widen_rows(x, context.shape[0])  # a no-op but in the UNet's first cross-attention
        x = x + Attention(self.attention, name="attn2", **kw)(norm("norm2")(x), context)
        x = x + FeedForward(name="ff", **kw)(norm("norm3")(x))
        return x


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over the H*W tokens -> proj_out, plus the input.

    ``x`` [B, H, W, C], ``context`` [B, S, Cctx] -> [B, H, W, C]. proj_in/out are 1x1 convs (SD v1)
    or Dense layers (``use_linear_projection``, SD v2).
    """

    attention: AttentionSpec
    depth: int = 1
    use_linear_projection: bool = False
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        dt, pdt = self.dtype, self.param_dtype
        b, hgt, wid, c = x.shape
        inner = self.attention.heads * self.attention.dim_head
        h = _f32_group_norm(self.groups, 1e-6, pdt, "norm")(x)
        # A 1x1 conv on NHWC is a Dense on the channel axis; only the parameter shape differs.
        if self.use_linear_projection:
            h = nn.Dense(inner, dtype=dt, param_dtype=pdt, name="proj_in")(h.reshape(b, hgt * wid, c))
        else:
            h = conv(inner, 1, dt, pdt, "proj_in")(h).reshape(b, hgt * wid, inner)
        for i in range(self.depth):
            h = BasicTransformerBlock(self.attention, dt, pdt, name=f"transformer_blocks_{i}")(h, context)
        if self.use_linear_projection:
            h = nn.Dense(c, dtype=dt, param_dtype=pdt, name="proj_out")(h).reshape(h.shape[0], hgt, wid, c)
        else:
            h = conv(c, 1, dt, pdt, "proj_out")(h.reshape(h.shape[0], hgt, wid, inner))
        return h + widen_rows(x, h.shape[0]).astype(h.dtype)


@dataclasses.dataclass(frozen=True)
class _LevelSpec:
    """Static per-level settings shared by the down/mid/up blocks."""

    channels: int
    heads: int
    depth: int
    use_linear_projection: bool
    upcast_attention: bool
    groups: int
    eps: float
    attention_impl: str
    attention_chunk_size: int | None
    remat: str | bool
    ignore_zero_context: bool = False

    def attention(self) -> AttentionSpec:
        """The attention settings of the level's transformers (``heads`` heads over ``channels``)."""
        if self.channels % self.heads:
            raise ValueError(f"{self.channels} channels are not divisible by {self.heads} attention heads")
        return AttentionSpec(self.heads, self.channels // self.heads, self.upcast_attention, self.attention_impl,
                             self.attention_chunk_size, self.ignore_zero_context)


class _Block(nn.Module):
    """Base of the UNet blocks: makes the (optionally rematerialised) resnets and transformers, all
    with the level's ``spec.channels`` output channels."""

    num_layers: int
    spec: _LevelSpec
    has_attention: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _remat(self, cls: type[nn.Module]) -> type[nn.Module]:
        return remat(cls, self.spec.remat)

    def _resnet(self, name: str) -> nn.Module:
        return self._remat(ResnetBlock2D)(self.spec.channels, self.spec.groups, self.spec.eps, norm_dtype=jnp.float32,
                                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _transformer(self, name: str) -> nn.Module:
        return self._remat(Transformer2DModel)(
            self.spec.attention(), self.spec.depth, self.spec.use_linear_projection,
            self.spec.groups, self.dtype, self.param_dtype, name=name)

    def _layer(self, j: int, x, temb, context):
        """``resnets_{j}``, then ``attentions_{j}`` if the block has attention."""
        x = self._resnet(f"resnets_{j}")(x, temb)
        return self._transformer(f"attentions_{j}")(x, context) if self.has_attention else x


class DownBlock2D(_Block):
    """``num_layers`` resnets (each followed by a transformer if ``has_attention``), then a
    downsampler if ``add_downsample``. Returns (h, skips) with one skip per resnet and downsampler."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for j in range(self.num_layers):
            x = self._layer(j, x, temb, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.spec.channels, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UpBlock2D(_Block):
    """``num_layers`` resnets on [h, skip] concatenated on channels (each followed by a transformer
    if ``has_attention``), then an upsampler to ``upsample_size`` if ``add_upsample``."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        if len(skips) != self.num_layers:
            raise ValueError(f"up block expects {self.num_layers} skip tensors, got {len(skips)}")
        for j in range(self.num_layers):
            x = jnp.concatenate([x, widen_rows(skips[-1 - j], x.shape[0]).astype(x.dtype)], axis=-1)
            x = self._layer(j, x, temb, context)
        if self.add_upsample:
            x = Upsample2D(self.spec.channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsamplers_0")(x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(_Block):
    """resnets_0, then (attentions_i, resnets_{i+1}) for i < num_layers; channels unchanged."""

    @nn.compact
    def __call__(self, x, temb, context):
        x = self._resnet("resnets_0")(x, temb)
        for i in range(self.num_layers):
            x = self._transformer(f"attentions_{i}")(x, context)
            x = self._resnet(f"resnets_{i + 1}")(x, temb)
        return x


def _per_level(value, n: int, name: str) -> tuple:
    if isinstance(value, (int, float, bool)) or value is None:
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries, expected one per level ({n}): {value}")
    return value


class UNet2DConditionModel(nn.Module):
    """Text-conditioned UNet of Stable Diffusion (diffusers ``UNet2DConditionModel``, SD subset).

    Attributes use diffusers' ``config.json`` names. ``attention_head_dim`` is, as in diffusers for
    SD, the NUMBER of heads per level (int or per-level tuple); ``num_attention_heads`` overrides it
    when given. ``remat`` rematerialises each resnet and transformer (training memory): a policy of
    :mod:`ldm_jax.models.remat` (``"none"``, ``"full"``, ``"dots"``, ``"offload"``) or a bool.

    Call: ``sample`` [B, H, W, in_channels] (NHWC), ``timesteps`` [B] or scalar (int or float),
    ``encoder_hidden_states`` [B, S, cross_attention_dim] -> [B, H, W, out_channels].

    The context may also hold ``k * B`` rows, ``k`` contexts per sample in order (rows ``k*i ..
    k*i + k - 1`` condition sample ``i``; classifier-free guidance's ``[uncond, cond]`` pairs): the
    output then has ``k * B`` rows, the same as feeding each sample ``k`` times, but the layers
    before the first cross-attention (``conv_in``, the first resnet, the first self-attention) run
    once per sample. Those are the costliest at the highest resolution.

    ``ignore_zero_context`` (not in diffusers; off there): the cross-attention gives no weight to
    context vectors that are all zeros, the padding positions of a text encoder with ``zero_padding``
    (:class:`~ldm_jax.models.ldm_bert.LDMBertModel`). The mask travels in the context itself, so
    every caller (training, the samplers, cached text contexts, guidance's stacked contexts) keeps it.
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int | Sequence[int] = 2
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    attention_head_dim: int | Sequence[int] = 8
    num_attention_heads: int | Sequence[int] | None = None
    cross_attention_dim: int | Sequence[int] = 1280
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int | Sequence[int] = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    attention_chunk_size: int | None = None
    remat: str | bool = False
    ignore_zero_context: bool = False

    def _check(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"need one down and one up block type per level: {n} block_out_channels, "
                f"{len(self.down_block_types)} down_block_types, {len(self.up_block_types)} up_block_types"
            )
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"unsupported down block type {t!r}; expected one of {DOWN_BLOCK_TYPES}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"unsupported up block type {t!r}; expected one of {UP_BLOCK_TYPES}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"unsupported mid block type {self.mid_block_type!r}; expected {MID_BLOCK_TYPES}")

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states):
        self._check()
        n = len(self.block_out_channels)
        heads = _per_level(
            self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim,
            n,
            "attention heads",
        )
        layers = _per_level(self.layers_per_block, n, "layers_per_block")
        depths = _per_level(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        ctx_dims = _per_level(self.cross_attention_dim, n, "cross_attention_dim")
        if len(set(ctx_dims)) != 1:
            raise ValueError(f"per-level cross_attention_dim {ctx_dims} is not supported (one context is passed)")

        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise ValueError(
                f"sample must be NHWC [B, H, W, {self.in_channels}], got shape {tuple(sample.shape)}"
            )
        batch = sample.shape[0]
        ctx = encoder_hidden_states
        if ctx.ndim != 3 or ctx.shape[0] % batch or ctx.shape[-1] != ctx_dims[0]:
            raise ValueError(
                f"encoder_hidden_states must be [k * {batch}, S, {ctx_dims[0]}] (k contexts per sample), "
                f"got shape {tuple(ctx.shape)}"
            )
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim == 0 or timesteps.shape == (1,):
            timesteps = jnp.broadcast_to(timesteps.reshape(()), (batch,))
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or [{batch}], got shape {timesteps.shape}")

        dt, pdt = self.dtype, self.param_dtype
        ch0 = self.block_out_channels[0]
        t_emb = get_timestep_embedding(timesteps, ch0, self.flip_sin_to_cos, self.freq_shift).astype(dt)
        temb = TimestepEmbedding(4 * ch0, dtype=dt, param_dtype=pdt, name="time_embedding")(t_emb)
        ctx = ctx.astype(dt)

        def level(i: int) -> dict:
            spec = _LevelSpec(
                channels=self.block_out_channels[i],
                heads=heads[i],
                depth=depths[i],
                use_linear_projection=self.use_linear_projection,
                upcast_attention=self.upcast_attention,
                groups=self.norm_num_groups,
                eps=self.norm_eps,
                attention_impl=self.attention_impl,
                attention_chunk_size=self.attention_chunk_size,
                remat=self.remat,
                ignore_zero_context=self.ignore_zero_context,
            )
            return dict(spec=spec, dtype=dt, param_dtype=pdt)

        x = conv(ch0, 3, dt, pdt, "conv_in")(sample.astype(dt))
        skips = [x]
        for i, block_type in enumerate(self.down_block_types):
            x, s = DownBlock2D(num_layers=layers[i], has_attention=block_type.startswith("CrossAttn"),
                               add_downsample=i < n - 1, name=f"down_blocks_{i}", **level(i))(x, temb, ctx)
            skips.extend(s)

        x = UNetMidBlock2DCrossAttn(num_layers=1, has_attention=True, name="mid_block", **level(n - 1))(x, temb, ctx)

        for i, block_type in enumerate(self.up_block_types):
            num = layers[n - 1 - i] + 1
            block_skips, skips = skips[-num:], skips[:-num]
            # Upsample to the next skip's size, so inputs not divisible by 2**(n-1) still line up.
            up_size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
            up = UpBlock2D(num_layers=num, has_attention=block_type.startswith("CrossAttn"),
                           add_upsample=i < n - 1, name=f"up_blocks_{i}", **level(n - 1 - i))
            x = up(x, block_skips, temb, ctx, up_size)

        x = nn.silu(_f32_group_norm(self.norm_num_groups, self.norm_eps, pdt, "conv_norm_out")(x))
        return widen_rows(conv(self.out_channels, 3, dt, pdt, "conv_out")(x), ctx.shape[0])


# diffusers UNet2DConditionModel options outside the SD subset, with the value that means "off".
# unet_from_config drops them when they have that value and refuses the config otherwise.
_OFF_OPTIONS = {
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "mid_block_scale_factor": 1,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "dropout": 0.0,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "cross_attention_norm": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None,
    "addition_time_embed_dim": None,
}


def unet_from_config(cfg: Mapping[str, Any], **overrides) -> UNet2DConditionModel:
    """Build a :class:`UNet2DConditionModel` from a diffusers ``config.json`` dict (or ``config.unet``).

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) and unknown keys are
    dropped, lists become tuples; ``overrides`` (e.g. ``dtype``, ``attention_impl``) win.

    Raises:
      ValueError: the config turns on a diffusers feature this module does not implement.
    """
    fields = {f.name for f in dataclasses.fields(UNet2DConditionModel)} - {"parent", "name"}
    kwargs = {}
    for key, value in dict(cfg).items():
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if key in fields:
            kwargs[key] = value
        elif key in _OFF_OPTIONS and value is not None and value != _OFF_OPTIONS[key]:
            if key == "only_cross_attention" and not any(_per_level(value, 1, key) if isinstance(value, bool) else value):
                continue  # a per-level tuple of False
            raise ValueError(f"unsupported UNet config: {key}={value!r} (supported: {_OFF_OPTIONS[key]!r})")
    kwargs.update(overrides)
    return UNet2DConditionModel(**kwargs)
