"""The CLIP text encoder of Stable Diffusion (frozen conditioning network), in Flax.

The module tree mirrors transformers' ``CLIPTextModel`` (``text_model.embeddings.token_embedding``,
``text_model.encoder.layers.{i}.self_attn.q_proj``, ..., ``text_model.final_layer_norm``), so a
``CLIPTextModel`` state dict maps onto the params through :func:`ldm_jax.convert.torch_flax.torch_to_flax`
with no table (see ``ldm_jax.convert.torch_flax.clip_text_params_from_torch``). Attributes are
``CLIPTextConfig`` names.

SD v1 conditions on ``last_hidden_state`` (CLIP ViT-L/14); SD v2 on OpenCLIP ViT-H's penultimate
layer passed through the final LayerNorm. ``hidden_layer`` picks which one is returned as ``context``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import causal_mask, dot_product_attention
from ldm_jax.models.config_file import read_model_config

__all__ = [
    "CLIPTextOutput",
    "CLIPTextModel",
    "clip_text_from_config",
    "HIDDEN_LAYERS",
]

HIDDEN_LAYERS = ("last", "penultimate")


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class CLIPTextOutput(NamedTuple):
    """Outputs of :class:`CLIPTextModel` (all ``[B, L, D]`` except ``pooler_output [B, D]``)."""

    last_hidden_state: jax.Array  # last layer + final LayerNorm
    penultimate: jax.Array  # second-to-last layer output + final LayerNorm (SD v2 style)
    pooler_output: jax.Array  # last_hidden_state at the EOS position
    context: jax.Array  # the one of the two above that ``hidden_layer`` selects


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        init = nn.initializers.normal(0.02)
        tok = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="token_embedding")
        pos = nn.Embed(self.max_position_embeddings, self.hidden_size, embedding_init=init,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="position_embedding")
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[-1]))[None]


class CLIPAttention(nn.Module):
    hidden_size: int
    num_attention_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, mask):
        b, n, _ = x.shape
        head_dim = self.hidden_size // self.num_attention_heads

        def proj(name):
            return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        q, k, v = (proj(name)(x).reshape(b, n, self.num_attention_heads, head_dim)
                   for name in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, mask=mask, impl=self.attention_impl)
        return proj("out_proj")(out.reshape(b, n, self.hidden_size))


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = _ACTIVATIONS[self.hidden_act](x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, mask):
        def ln(name):
            return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        x = x + CLIPAttention(self.hidden_size, self.num_attention_heads, self.dtype, self.param_dtype,
                              self.attention_impl, name="self_attn")(ln("layer_norm1")(x), mask)
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype,
                           self.param_dtype, name="mlp")(ln("layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """Stack of :class:`CLIPEncoderLayer` (``layers_0`` ...); returns every hidden state, embeddings first."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, mask):
        hidden_states = [x]
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_attention_heads,
                                 self.hidden_act, self.layer_norm_eps, self.dtype, self.param_dtype,
                                 self.attention_impl, name=f"layers_{i}")(x, mask)
            hidden_states.append(x)
        return hidden_states


class CLIPTextTransformer(nn.Module):
    """transformers' ``CLIPTextModel.text_model``: embeddings -> causal encoder -> final LayerNorm."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, input_ids):
        x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                               self.dtype, self.param_dtype, name="embeddings")(input_ids)
        hidden_states = CLIPEncoder(
            self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads,
            self.hidden_act, self.layer_norm_eps, self.dtype, self.param_dtype, self.attention_impl,
            name="encoder")(x, causal_mask(input_ids.shape[-1]))
        final_ln = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="final_layer_norm")
        last = final_ln(hidden_states[-1])
        penultimate = final_ln(hidden_states[-2])
        if self.eos_token_id == 2:
            # Legacy CLIP configs (eos_token_id=2, e.g. openai/clip-vit-large-patch14): transformers
            # pools at the highest token id, which is EOS in the original vocab.
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:  # first EOS (pad may equal EOS)
            eos_pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        return last, penultimate, pooled


class CLIPTextModel(nn.Module):
    """CLIP text encoder: ``input_ids [B, L] int`` (L <= max_position_embeddings, 77 in SD) -> :class:`CLIPTextOutput`.

    The attention is causal (as CLIP's); no padding mask, as in the SD pipelines.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    hidden_layer: str = "last"  # "last" (SD v1) | "penultimate" (SD v2 from a 24-layer OpenCLIP)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, input_ids) -> CLIPTextOutput:
        if self.hidden_layer not in HIDDEN_LAYERS:
            raise ValueError(f"CLIPTextModel: hidden_layer must be one of {HIDDEN_LAYERS}, got {self.hidden_layer!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIPTextModel: unsupported hidden_act {self.hidden_act!r}; "
                             f"expected one of {tuple(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextModel: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_layer == "penultimate" and self.num_hidden_layers < 1:
            raise ValueError("CLIPTextModel: hidden_layer='penultimate' needs at least one layer")
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"CLIPTextModel expects integer input_ids [batch, length], got "
                             f"{input_ids.dtype} {input_ids.shape}")
        if input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: sequence length {input_ids.shape[1]} exceeds "
                             f"max_position_embeddings {self.max_position_embeddings}")
        last, penultimate, pooled = CLIPTextTransformer(
            self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers,
            self.num_attention_heads, self.max_position_embeddings, self.hidden_act, self.layer_norm_eps,
            self.eos_token_id, self.dtype, self.param_dtype, self.attention_impl, name="text_model")(input_ids)
        context = last if self.hidden_layer == "last" else penultimate
        return CLIPTextOutput(last, penultimate, pooled, context)


# Keys of a transformers config.json that configure the module (others, e.g. "dtype",
# "architectures", "projection_dim", are dropped).
_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "bos_token_id",
                  "eos_token_id", "hidden_layer")


def clip_text_from_config(config: Mapping[str, Any] | str | os.PathLike, **overrides) -> CLIPTextModel:
    """Build a :class:`CLIPTextModel` from a config mapping, a ``config.json`` path or its folder.

    Unknown keys (transformers bookkeeping such as ``architectures``, ``torch_dtype``) are dropped;
    ``overrides`` (e.g. ``dtype=jnp.bfloat16``, ``attention_impl="xla"``, ``hidden_layer=...``) win.
    """
    config = read_model_config(config)
    cfg = {k: config[k] for k in _CONFIG_FIELDS if k in config and config[k] is not None}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(cfg.get(key), (list, tuple)):  # transformers allows a list of ids
            cfg[key] = cfg[key][0]
    cfg.update(overrides)
    return CLIPTextModel(**cfg)
