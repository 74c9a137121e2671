"""The key-mapping table between PyTorch state dicts and ldm_jax Flax parameter trees.

ldm_jax modules mirror the module trees of diffusers/transformers, so one table of rules maps
every parameter in both directions:

==========================  ===========================  ==================================
PyTorch key (dots)          Flax path (tuple)            value
==========================  ===========================  ==================================
``a.b.0.c.weight`` (conv)   ``('a', 'b_0', 'c', 'kernel')``  OIHW -> HWIO, ``transpose(2,3,1,0)``
``a.weight`` (linear)       ``('a', 'kernel')``          (out, in) -> (in, out), transpose
``a.weight`` (norm)         ``('a', 'scale')``           unchanged
``a.weight`` (embedding)    ``('a', 'embedding')``       unchanged
``a.bias``                  ``('a', 'bias')``            unchanged
``a.<other>``               ``('a', '<other>')``         unchanged (e.g. a learned scalar, or
                                                         GPT-2's ``Conv1D`` ``weight``, stored
                                                         ``[in, out]`` already)
==========================  ===========================  ==================================

A numeric component of a PyTorch key is joined to the one before it with ``_``
(``down_blocks.0`` <-> ``down_blocks_0``), as ``nn.ModuleList`` indices become Flax names.
The Flax leaf name (``kernel``/``scale``/``embedding``) is read off the target parameter tree,
so the table needs no per-model exceptions; names that end in ``_<digit>`` without being an
index (``linear_1``, GPT-2's ``ln_1``) are listed in ``_LITERAL_NAMES``. A 1x1 conv stored where
a linear layer is expected (old VAE attention checkpoints) is squeezed to a matrix.

The per-model entry points (:func:`autoencoder_params_from_torch`, :func:`clip_text_params_from_torch`,
:func:`clip_params_from_torch`, :func:`gpt2_params_from_torch`) only add what a model's checkpoints
carry beyond the table: buffers to drop, a key prefix to restore. The UNet needs none and uses
:func:`torch_to_flax` directly.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

__all__ = [
    "WeightsError",
    "torch_key_to_flax_path",
    "flax_path_to_torch_key",
    "torch_to_flax",
    "flax_to_torch",
    "autoencoder_params_from_torch",
    "clip_text_params_from_torch",
    "clip_params_from_torch",
    "gpt2_params_from_torch",
]

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


class WeightsError(ValueError):
    """A checkpoint does not fit the model: missing/unexpected keys, shape mismatch, bad file."""


def torch_key_to_flax_path(key: str, leaf: str | None = None) -> tuple[str, ...]:
    """``'down_blocks.0.resnets.1.conv1.weight'`` -> ``('down_blocks_0', 'resnets_1', 'conv1', leaf)``.

    ``leaf`` replaces the last component when given (``weight`` -> ``kernel``/``scale``/...).
    """
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    if leaf is not None:
        parts[-1] = leaf
    return tuple(parts)


_INDEXED = re.compile(r"^(.*\D)_(\d+)$")
# PyTorch attribute names that themselves end in ``_<digit>`` (not list indices), kept whole.
_LITERAL_NAMES = frozenset({"linear_1", "linear_2",  # diffusers TimestepEmbedding
                            "ln_1", "ln_2"})  # transformers GPT2Block


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of :func:`torch_key_to_flax_path`; ``kernel``/``scale``/``embedding`` -> ``weight``."""
    parts = []
    for i, name in enumerate(path):
        if i == len(path) - 1:
            parts.append("weight" if name in _WEIGHT_LEAVES else name)
            continue
        m = None if name in _LITERAL_NAMES else _INDEXED.match(name)
        parts.extend([m.group(1), m.group(2)] if m else [name])
    return ".".join(parts)


def _to_flax_value(leaf: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4 and len(target_shape) == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 4 and len(target_shape) == 2:  # 1x1 conv stored for a linear layer
            value = value[:, :, 0, 0].T
        elif value.ndim == 2:
            value = value.T
    elif value.ndim == 4 and len(target_shape) == 1 and value.size == target_shape[0]:
        value = value.reshape(target_shape)
    return value


def _to_torch_value(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
        if value.ndim == 2:
            return value.T
    return value


def torch_to_flax(
    state_dict: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    source: str = "state dict",
    ignore: tuple[str, ...] = (),
    dtype: Any = None,
) -> dict:
    """Map a PyTorch state dict onto the Flax parameter tree ``target``.

    Args:
      state_dict: key -> array (numpy or anything ``np.asarray`` takes).
      target: the nested Flax params (or their ``jax.ShapeDtypeStruct``s from ``jax.eval_shape``);
        its paths decide the leaf names and the expected shapes.
      source: name of the file/folder, quoted in errors.
      ignore: regular expressions of PyTorch keys to drop silently (buffers such as ``position_ids``).
      dtype: cast every array to this numpy dtype (default: keep the target's dtype).

    Returns:
      A nested dict of numpy arrays with exactly ``target``'s structure.

    Raises:
      WeightsError: naming the source and every missing/unexpected key or mismatched shape.
    """
    flat_target = traverse_util.flatten_dict(dict(target))
    by_torch_key = {flax_path_to_torch_key(path): path for path in flat_target}
    out: dict = {}
    unexpected, mismatched = [], []
    seen: set = set()  # paths present in the checkpoint but with the wrong shape
    for key, value in state_dict.items():
        path = by_torch_key.get(key)
        if path is None:
            if not any(re.search(pat, key) for pat in ignore):
                unexpected.append(key)
            continue
        want = tuple(flat_target[path].shape)
        arr = _to_flax_value(path[-1], np.asarray(value), want)
        if tuple(arr.shape) != want:
            mismatched.append(f"{key}: checkpoint {tuple(np.shape(value))}, model expects {want}")
            seen.add(path)
            continue
        out[path] = arr.astype(dtype or flat_target[path].dtype)
    missing = [flax_path_to_torch_key(p) for p in flat_target if p not in out and p not in seen]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched)}")
    if problems:
        raise WeightsError(f"{source} does not fit the model: " + "; ".join(problems))
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_to_flax`: nested Flax params -> flat PyTorch-layout numpy state dict."""
    flat = traverse_util.flatten_dict(dict(params))
    return {
        flax_path_to_torch_key(path): np.ascontiguousarray(_to_torch_value(path[-1], np.asarray(v)))
        for path, v in flat.items()
    }


def autoencoder_params_from_torch(state_dict: Mapping[str, Any], target: Mapping[str, Any], *,
                                  source: str = "autoencoder state dict", dtype: Any = None) -> dict:
    """Map a diffusers ``AutoencoderKL``/``VQModel`` state dict onto the params ``target``.

    ``target`` is the ``params`` collection (arrays or ``jax.eval_shape`` structs). Old diffusers
    checkpoints with 1x1-conv attention weights are squeezed by the mapping table. Raises
    ``WeightsError`` naming missing/unexpected keys.
    """
    return torch_to_flax(state_dict, target, source=source, dtype=dtype)


def clip_text_params_from_torch(state_dict: Mapping[str, Any], target: Mapping[str, Any], *,
                                source: str = "CLIP text encoder state dict", dtype: Any = None) -> dict:
    """Map a transformers ``CLIPTextModel`` state dict onto ``ldm_jax.models.clip_text.CLIPTextModel``
    params ``target``.

    Accepts keys with the ``text_model.`` prefix (checkpoint files, transformers 4) or without it
    (in-memory ``state_dict()`` of transformers 5); drops the ``position_ids`` buffer. ``target``
    is the ``params`` collection (arrays or ``jax.eval_shape`` structs). Raises ``WeightsError``.
    """
    if state_dict and not any(k.startswith("text_model.") for k in state_dict):
        state_dict = {f"text_model.{k}": v for k, v in state_dict.items()}
    return torch_to_flax(state_dict, target, source=source, ignore=(r"position_ids$",), dtype=dtype)


def clip_params_from_torch(state_dict: Mapping[str, Any], target: Mapping[str, Any], *,
                           source: str = "CLIP state dict", dtype: Any = None) -> dict:
    """Map a transformers ``CLIPModel`` state dict onto ``ldm_jax.models.clip_vision.CLIPModel``
    params ``target``.

    The keys (``vision_model.embeddings.class_embedding``, ``logit_scale``, ...) go through the
    shared table as they are; the ``position_ids`` buffers are dropped. ``target``: the ``params``
    collection (arrays or ``jax.eval_shape`` structs). Raises ``WeightsError``.
    """
    return torch_to_flax(state_dict, target, source=source, ignore=(r"position_ids$",), dtype=dtype)


# Not parameters: the causal-mask buffers of old GPT-2 checkpoints, and the LM head tied to ``wte``.
_GPT2_BUFFERS = (r"(^|\.)attn\.(masked_)?bias$", r"^lm_head\.weight$")


def gpt2_params_from_torch(state_dict: Mapping[str, Any], target: Mapping[str, Any], *,
                           source: str = "GPT-2 state dict", dtype: Any = None) -> dict:
    """Map a transformers ``GPT2LMHeadModel`` state dict onto ``ldm_jax.models.gpt2.GPT2LMHeadModel``
    params ``target``.

    Accepts keys with the ``transformer.`` prefix or without it (``GPT2Model`` layout, the original
    ``gpt2`` files); drops the ``attn.bias``/``attn.masked_bias`` buffers and ``lm_head.weight`` (tied
    to ``wte``). ``Conv1D`` weights go through the table untransposed (their Flax leaf is ``weight``).
    ``target``: the ``params`` collection (arrays or ``jax.eval_shape`` structs). Raises ``WeightsError``.
    """
    state_dict = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
                  for k, v in state_dict.items()}
    return torch_to_flax(state_dict, target, source=source, ignore=_GPT2_BUFFERS, dtype=dtype)


def _preview(items: list[str], n: int = 8) -> str:
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")
