"""The text encoder a config names: CLIP (SD) or LDM's BERT-style transformer.

``config.text_encoder.model_type`` picks the module as transformers' ``config.json`` does:
``"ldmbert"`` (:class:`~ldm_jax.models.ldm_bert.LDMBertModel`), anything else or absent CLIP
(:class:`~ldm_jax.models.clip_text.CLIPTextModel`, ``"clip_text_model"``). Every place that builds
the text encoder from a config goes through :func:`text_encoder_from_config`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn

from ldm_jax.models.config_file import read_model_config

__all__ = ["LDMBERT", "is_ldmbert", "text_encoder_from_config", "context_width", "context_width_key",
           "check_padding", "config_fields"]

LDMBERT = "ldmbert"


def is_ldmbert(config: Mapping[str, Any]) -> bool:
    return dict(config).get("model_type") == LDMBERT


def config_fields(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys of ``config`` that configure its module (``model_type`` included: it picks the module)."""
    if is_ldmbert(config):
        from ldm_jax.models.ldm_bert import CONFIG_FIELDS

        return CONFIG_FIELDS + ("model_type",)
    from ldm_jax.models.clip_text import _CONFIG_FIELDS

    return _CONFIG_FIELDS + ("model_type",)


def text_encoder_from_config(config: Mapping[str, Any] | str | os.PathLike, **overrides) -> nn.Module:
    """The module of a text-encoder config (mapping, ``config.json`` or its folder); bookkeeping keys are
    dropped, ``overrides`` (``dtype=...``, ``attention_impl=...``) win."""
    cfg = read_model_config(config)
    if is_ldmbert(cfg):
        from ldm_jax.models.ldm_bert import CONFIG_FIELDS, LDMBertModel

        kw = {k: cfg[k] for k in CONFIG_FIELDS if cfg.get(k) is not None}
        kw.update({k: v for k, v in overrides.items() if k != "hidden_layer"})  # CLIP's option: one layer here
        return LDMBertModel(**kw)
    from ldm_jax.models.clip_text import clip_text_from_config

    return clip_text_from_config(cfg, **overrides)


def context_width_key(config: Mapping[str, Any]) -> str:
    """The config key of the context's width: CLIP's ``hidden_size``, LDMBert's ``d_model``."""
    return "d_model" if is_ldmbert(config) else "hidden_size"


def context_width(config: Mapping[str, Any]) -> int:
    """The width of the context the text encoder gives the UNet (``config[context_width_key(config)]``)."""
    return int(dict(config)[context_width_key(config)])


def check_padding(encoder: nn.Module, tokenizer) -> None:
    """An encoder that zeroes its padding (LDMBert's ``zero_padding``) must know the tokenizer's padding
    id, or a prompt's padding stays in the UNet's cross-attention: ValueError otherwise."""
    if tokenizer is None or not getattr(encoder, "zero_padding", False):
        return
    if int(encoder.pad_token_id) != int(tokenizer.pad_token_id):
        raise ValueError(f"config.text_encoder.pad_token_id={encoder.pad_token_id} is not the tokenizer's padding "
                         f"id {tokenizer.pad_token_id}: set it to {tokenizer.pad_token_id} (text_encoder.zero_padding "
                         "zeroes those positions)")
