"""LDM's BERT-style text encoder (``LDMBertModel``), trained jointly with the UNet.

The original latent-diffusion text-to-image models (LDM paper, Sec. 4.3; ``BERTEmbedder`` in
CompVis/latent-diffusion) condition on a transformer trained from scratch with the UNet over BERT's
WordPiece tokens: token + learned position embeddings, ``encoder_layers`` pre-LN blocks of
bidirectional self-attention (no bias on q/k/v, ``head_dim`` per head, so the attention width may
differ from ``d_model``) and a GELU MLP, a final LayerNorm; its last hidden states are the
cross-attention context. The module mirrors diffusers' PyTorch ``LDMBertModel`` (the ``bert``
component of ``CompVis/ldm-text2im-large-256``) name for name, so the one key table
(:mod:`ldm_jax.convert.torch_flax`) maps its checkpoints; like the diffusers pipeline it takes no
padding mask. ``to_logits`` (the unused masked-LM head of the checkpoint) is not part of it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import dot_product_attention

__all__ = ["LDMBertOutput", "LDMBertModel", "CONFIG_FIELDS"]

_ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
                "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
                "relu": jax.nn.relu}
# LDMBertPreTrainedModel._init_weights: normal(0.02) weights, zero biases
_INIT = nn.initializers.normal(0.02)

# Keys of a diffusers ``LDMBertConfig`` that configure the module (others are dropped).
CONFIG_FIELDS = ("vocab_size", "d_model", "encoder_layers", "encoder_ffn_dim", "encoder_attention_heads", "head_dim",
                 "max_position_embeddings", "activation_function", "pad_token_id", "zero_padding")


class LDMBertOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, L, d_model], after the final LayerNorm
    context: jax.Array  # the same: what the UNet cross-attends to


class LDMBertAttention(nn.Module):
    num_heads: int
    head_dim: int
    embed_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, n, _ = x.shape
        inner = self.num_heads * self.head_dim

        def proj(name, width, bias):
            return nn.Dense(width, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_INIT,
                            name=name)

        q, k, v = (proj(name, inner, False)(x).reshape(b, n, self.num_heads, self.head_dim)
                   for name in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, impl=self.attention_impl)
        return proj("out_proj", self.embed_dim, True)(out.reshape(b, n, inner))


class LDMBertEncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(ln(x))`` then ``x + fc2(act(fc1(ln(x))))``."""

    d_model: int
    encoder_ffn_dim: int
    encoder_attention_heads: int
    head_dim: int
    activation_function: str = "gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        def ln(name):
            return nn.LayerNorm(1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        def dense(width, name):
            return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_INIT, name=name)

        x = x + LDMBertAttention(self.encoder_attention_heads, self.head_dim, self.d_model, self.dtype,
                                 self.param_dtype, self.attention_impl, name="self_attn")(ln("self_attn_layer_norm")(x))
        h = _ACTIVATIONS[self.activation_function](dense(self.encoder_ffn_dim, "fc1")(ln("final_layer_norm")(x)))
        return x + dense(self.d_model, "fc2")(h)


class LDMBertEncoder(nn.Module):
    vocab_size: int
    d_model: int
    encoder_layers: int
    encoder_ffn_dim: int
    encoder_attention_heads: int
    head_dim: int
    max_position_embeddings: int
    activation_function: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, input_ids):
        embed = lambda n, name: nn.Embed(n, self.d_model, embedding_init=_INIT, param_dtype=self.param_dtype,  # noqa: E731
                                         name=name)
        positions = jnp.arange(input_ids.shape[1])
        x = (embed(self.vocab_size, "embed_tokens")(input_ids)
             + embed(self.max_position_embeddings, "embed_positions")(positions)[None]).astype(self.dtype)
        for i in range(self.encoder_layers):
            x = LDMBertEncoderLayer(self.d_model, self.encoder_ffn_dim, self.encoder_attention_heads, self.head_dim,
                                    self.activation_function, self.dtype, self.param_dtype, self.attention_impl,
                                    name=f"layers_{i}")(x)
        return nn.LayerNorm(1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name="layer_norm")(x)


class LDMBertModel(nn.Module):
    """``input_ids [B, L] int`` (L <= ``max_position_embeddings``) -> :class:`LDMBertOutput`.

    Defaults: diffusers' ``LDMBertConfig`` (LDM's 1.45B text-to-image model: 32 layers of width 1280).

    ``zero_padding`` (not in diffusers; off there): the context is zero at the ``pad_token_id``
    positions, which a UNet with ``ignore_zero_context`` then leaves out of its cross-attention, so a
    prompt's few tokens are not averaged with dozens of padding vectors (a UNet and encoder learning
    from nothing together pick up the prompt far sooner: docs/text2face.md).
    """

    vocab_size: int = 30522
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_ffn_dim: int = 5120
    encoder_attention_heads: int = 8
    head_dim: int = 64
    max_position_embeddings: int = 77
    activation_function: str = "gelu"
    pad_token_id: int = 0
    zero_padding: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @property
    def hidden_size(self) -> int:
        """The context width (the UNet's ``cross_attention_dim``)."""
        return self.d_model

    @nn.compact
    def __call__(self, input_ids) -> LDMBertOutput:
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(f"LDMBertModel: unsupported activation_function {self.activation_function!r}; "
                             f"expected one of {tuple(_ACTIVATIONS)}")
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"LDMBertModel expects integer input_ids [batch, length], got "
                             f"{input_ids.dtype} {input_ids.shape}")
        if input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(f"LDMBertModel: sequence length {input_ids.shape[1]} exceeds "
                             f"max_position_embeddings {self.max_position_embeddings}")
        last = LDMBertEncoder(self.vocab_size, self.d_model, self.encoder_layers, self.encoder_ffn_dim,
                              self.encoder_attention_heads, self.head_dim, self.max_position_embeddings,
                              self.activation_function, self.dtype, self.param_dtype, self.attention_impl,
                              name="model")(input_ids)
        if self.zero_padding:
            last = jnp.where((input_ids == self.pad_token_id)[..., None], jnp.zeros((), last.dtype), last)
        return LDMBertOutput(last, last)
