"""CLIP's vision tower and the two-tower ``CLIPModel`` (image/text embeddings, logits), in Flax.

Used for CLIP score (:mod:`ldm_jax.eval.clip_score`), not by Stable Diffusion itself. The module
tree mirrors transformers' ``CLIPModel``: ``vision_model.embeddings.patch_embedding``,
``vision_model.pre_layrnorm`` (sic), ``vision_model.encoder.layers.{i}...``,
``vision_model.post_layernorm``, ``text_model...`` (the text transformer of
:mod:`ldm_jax.models.clip_text`), ``visual_projection``, ``text_projection``, ``logit_scale``, so a
``CLIPModel`` state dict maps onto the params through the shared table of
:mod:`ldm_jax.convert.torch_flax` (``clip_params_from_torch`` there).

Images are NHWC (transformers: NCHW) and already preprocessed: ``[B, S, S, 3]`` float, S = ``image_size``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
from flax.core import FrozenDict

from ldm_jax.models.clip_text import _ACTIVATIONS, CLIPEncoder, CLIPTextTransformer, clip_text_from_config
from ldm_jax.models.config_file import read_model_config

__all__ = [
    "CLIPOutput",
    "CLIPVisionTransformer",
    "CLIPModel",
    "clip_model_from_config",
]

# transformers' CLIPVisionConfig defaults (ViT-B/32); keys of ``vision_config`` that configure the tower.
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# Fields of CLIPTextTransformer taken from the text config (dtype etc. come from CLIPModel).
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")


class CLIPOutput(NamedTuple):
    """Outputs of :class:`CLIPModel` for ``Ni`` images and ``Nt`` texts."""

    logits_per_image: Any  # [Ni, Nt] = exp(logit_scale) * cos(image, text)
    logits_per_text: Any  # [Nt, Ni], the transpose
    text_embeds: Any  # [Nt, projection_dim], L2-normalised
    image_embeds: Any  # [Ni, projection_dim], L2-normalised


class CLIPVisionEmbeddings(nn.Module):
    """Patchify (conv, stride = patch, no bias), prepend the class embedding, add position embeddings."""

    hidden_size: int
    image_size: int
    patch_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        b = pixel_values.shape[0]
        p = self.patch_size
        patches = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(pixel_values)
        patches = patches.reshape(b, -1, self.hidden_size)  # row-major over the patch grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (self.hidden_size,), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, self.hidden_size))
        num_positions = (self.image_size // p) ** 2 + 1
        pos = nn.Embed(num_positions, self.hidden_size, embedding_init=nn.initializers.normal(0.02),
                       dtype=self.dtype, param_dtype=self.param_dtype, name="position_embedding")
        return jnp.concatenate([cls, patches], axis=1) + pos(jnp.arange(num_positions))[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' ``CLIPModel.vision_model``: ``pixel_values [B, S, S, C]`` -> ``(last_hidden_state
    [B, 1 + (S/patch)^2, D]``, ``pooled [B, D]``); pooled = ``post_layernorm`` of the class token."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, pixel_values):
        want = (self.image_size, self.image_size, self.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"CLIP vision tower expects pixel_values [B, {want[0]}, {want[1]}, {want[2]}] "
                             f"(NHWC, preprocessed), got {pixel_values.shape}")

        def ln(name):
            return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, self.dtype, self.param_dtype,
                                 name="embeddings")(pixel_values.astype(self.dtype))
        hidden_states = CLIPEncoder(
            self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads,
            self.hidden_act, self.layer_norm_eps, self.dtype, self.param_dtype, self.attention_impl,
            name="encoder")(ln("pre_layrnorm")(x), None)
        last = hidden_states[-1]
        return last, ln("post_layernorm")(last[:, 0])


class CLIPModel(nn.Module):
    """Two-tower CLIP. Build with :func:`clip_model_from_config`.

    ``text_config``/``vision_config``: field -> value of :class:`CLIPTextTransformer` /
    :class:`CLIPVisionTransformer` (FrozenDicts, so the module stays hashable).
    """

    text_config: Mapping[str, Any]
    vision_config: Mapping[str, Any]
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
        self.text_model = CLIPTextTransformer(**self.text_config, **kw)
        self.vision_model = CLIPVisionTransformer(**self.vision_config, **kw)
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual_projection = nn.Dense(self.projection_dim, **dense)
        self.text_projection = nn.Dense(self.projection_dim, **dense)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init_value), (),
                                      self.param_dtype)

    @property
    def image_size(self) -> int:
        return int(self.vision_config["image_size"])

    @property
    def max_text_length(self) -> int:
        return int(self.text_config["max_position_embeddings"])

    def get_image_features(self, pixel_values):
        """``[B, S, S, 3]`` preprocessed pixels -> projected, unnormalised image embeddings ``[B, P]``."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def get_text_features(self, input_ids):
        """``int [B, L]`` token ids (BOS ... EOS, padded) -> projected, unnormalised text embeddings ``[B, P]``."""
        return self.text_projection(self.text_model(jnp.asarray(input_ids))[2])

    def __call__(self, input_ids, pixel_values) -> CLIPOutput:
        img = self.get_image_features(pixel_values).astype(jnp.float32)
        txt = self.get_text_features(input_ids).astype(jnp.float32)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        logits_per_text = txt @ img.T * jnp.exp(self.logit_scale.astype(jnp.float32))
        return CLIPOutput(logits_per_text.T, logits_per_text, txt, img)


def _sub_config(config: Mapping[str, Any], name: str) -> dict:
    """``config[name]`` updated by the legacy ``config[name + '_dict']`` (older CLIP config.json files)."""
    return {**(config.get(name) or {}), **(config.get(f"{name}_dict") or {})}


def clip_model_from_config(config: Mapping[str, Any] | str | os.PathLike, **overrides) -> CLIPModel:
    """Build a :class:`CLIPModel` from transformers' ``CLIPConfig`` fields (a mapping, config.json or its folder).

    Missing fields take transformers' defaults; unknown ones are dropped. ``overrides`` (``dtype``,
    ``param_dtype``, ``attention_impl``) win.
    """
    config = read_model_config(config)
    if "text_config" not in config and "vision_config" not in config:
        raise ValueError("CLIP config has neither text_config nor vision_config: not a CLIPModel config.json "
                         f"(model_type={config.get('model_type')!r})")
    text = clip_text_from_config(_sub_config(config, "text_config"))
    text_cfg = {k: getattr(text, k) for k in _TEXT_FIELDS}
    vision = _sub_config(config, "vision_config")
    vision_cfg = {k: vision[k] if vision.get(k) is not None else v for k, v in VISION_DEFAULTS.items()}
    for name, cfg in (("text", text_cfg), ("vision", vision_cfg)):
        if cfg["hidden_act"] not in _ACTIVATIONS:
            raise ValueError(f"CLIP {name} tower: unsupported hidden_act {cfg['hidden_act']!r}; "
                             f"expected one of {tuple(_ACTIVATIONS)}")
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ValueError(f"CLIP {name} tower: hidden_size {cfg['hidden_size']} is not a multiple of "
                             f"num_attention_heads {cfg['num_attention_heads']}")
    if vision_cfg["image_size"] % vision_cfg["patch_size"]:
        raise ValueError(f"CLIP vision tower: image_size {vision_cfg['image_size']} is not a multiple of "
                         f"patch_size {vision_cfg['patch_size']}")
    kw = dict(projection_dim=int(config.get("projection_dim") or 512),
              logit_scale_init_value=float(config.get("logit_scale_init_value") or 2.6592))
    kw.update(overrides)
    return CLIPModel(FrozenDict(text_cfg), FrozenDict(vision_cfg), **kw)
