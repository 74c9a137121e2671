"""CLIP score of images against their captions, with a transformers ``CLIPModel`` checkpoint in Flax.

Score of one image: ``100 * max(cos(image_embeds, text_embeds), 0)`` (Hessel et al. 2021 with
w = 100, as torchmetrics' ``CLIPScore``); :func:`clip_score` is the mean over images. torchmetrics
clamps the *mean* cosine at 0 instead of each one; both agree whenever no cosine is negative,
which is the case for real CLIP models on real captions.

Preprocessing (:func:`preprocess_images`) is transformers' ``CLIPImageProcessor`` for OpenAI
CLIPs: resize the shorter side to ``image_size`` (224 for ViT-L/14) with PIL bicubic on the uint8
image (long side ``int(size * long / short)``), center crop ``image_size`` (offsets
``(dim - size) // 2``), ``/ 255``, normalise with CLIP's mean/std. It runs the same PIL calls as
the processor's PIL backend, so pixels match it to float rounding (~1e-6); the processor's
torchvision backend (used when torchvision is installed) resizes with its own bicubic kernel and
differs by up to a few 1/255 steps before normalisation.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.torch_flax import WeightsError, clip_params_from_torch
from ldm_jax.models.clip_vision import CLIPModel, clip_model_from_config
from ldm_jax.models.tokenizer import PromptTokenizer

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "LoadedCLIP",
    "load_clip",
    "resize_center_crop",
    "preprocess_images",
    "clip_scores",
    "clip_score",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # OPENAI_CLIP_STD
# Files of a CLIPModel hub repo that load_clip reads (weights, config, tokenizer).
_HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
              "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class LoadedCLIP(NamedTuple):
    """What :func:`load_clip` returns; unpacks as ``model, params, tokenizer, source``."""

    model: CLIPModel
    params: dict  # the ``params`` collection
    tokenizer: PromptTokenizer | None  # None when the folder holds no tokenizer files
    source: str  # the folder the weights came from


# ----------------------------------------------------------------------------- loading


def _resolve_folder(path_or_hub_id: str | os.PathLike) -> str:
    path = os.path.expanduser(os.fspath(path_or_hub_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{path} is a file; load_clip expects a transformers CLIPModel folder "
                                "(config.json + model.safetensors, as written by CLIPModel.save_pretrained)")
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        raise FileNotFoundError(f"CLIP model folder {path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=_HUB_FILES)
    except Exception as e:  # offline, unknown repo, auth, network: all mean "not available here"
        raise FileNotFoundError(
            f"CLIP model {path!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Offline? Download it where there is network (e.g. "
            f"`huggingface-cli download {path}`) and pass the local folder.") from e


def _read_state_dict(folder: str) -> dict:
    from safetensors.numpy import load_file

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = [os.path.join(folder, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
        except (ValueError, KeyError, AttributeError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index: {e}") from e
    else:
        others = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
                  if os.path.exists(os.path.join(folder, n))]
        hint = f" (it has {', '.join(others)}: re-save it with safe_serialization=True)" if others else ""
        raise FileNotFoundError(f"{folder} has no model.safetensors{hint}")
    state_dict = {}
    for path in files:
        try:
            state_dict.update(load_file(path))
        except Exception as e:  # truncated/corrupt files raise several types
            raise WeightsError(f"cannot read CLIP weights {path} (corrupt or not a safetensors file?): "
                               f"{type(e).__name__}: {e}") from e
    return state_dict


def load_clip(path_or_hub_id: str | os.PathLike, *, tokenizer: "str | PromptTokenizer | None" = None,
              dtype: Any = jnp.float32, attention_impl: str = "auto") -> LoadedCLIP:
    """Load a transformers ``CLIPModel`` (e.g. ``openai/clip-vit-large-patch14``) into Flax.

    Args:
      path_or_hub_id: a folder with ``config.json`` and ``model.safetensors`` (``save_pretrained``),
        or a hub id, fetched with ``huggingface_hub.snapshot_download`` (cache first).
      tokenizer: a tokenizer folder / hub id / :class:`PromptTokenizer`; default: the model
        folder's own, if it has one (``vocab.json`` + ``merges.txt``), else ``None``.
      dtype: compute dtype (params stay float32).
    Raises:
      FileNotFoundError: no such folder, hub id not fetchable (offline), or no config/weights in it.
      WeightsError: corrupt config or weights, or weights that do not fit the config.
    """
    folder = _resolve_folder(path_or_hub_id)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} has no config.json: not a transformers CLIPModel folder")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        model = clip_model_from_config(config, dtype=dtype, attention_impl=attention_impl)
    except (ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise WeightsError(f"{config_path} is not a valid CLIPModel config: {e}") from e
    state_dict = _read_state_dict(folder)
    ids = jnp.zeros((1, model.max_text_length), jnp.int32)
    pixels = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    target = jax.eval_shape(model.init, jax.random.key(0), ids, pixels)["params"]
    params = jax.tree.map(jnp.asarray, clip_params_from_torch(state_dict, target, source=folder))
    if tokenizer is not None and not isinstance(tokenizer, PromptTokenizer):
        tokenizer = PromptTokenizer.from_pretrained(tokenizer)
    elif tokenizer is None and all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt")):
        tokenizer = PromptTokenizer.from_pretrained(folder)
    return LoadedCLIP(model, params, tokenizer, folder)


# ----------------------------------------------------------------------------- preprocessing


def _as_uint8_rgb(image: Any) -> np.ndarray:
    """HWC uint8 / [0, 1] float / PIL -> uint8 [H, W, 3] (gray repeated, alpha dropped)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"images must be uint8 or float in [0, 1], got {arr.dtype}")
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W, 1|3|4], got shape {arr.shape}")
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr[..., :3]


def resize_center_crop(image: Any, size: int) -> np.ndarray:
    """One HWC image -> uint8 ``[size, size, 3]``: shorter side to ``size`` (PIL bicubic), center crop."""
    from PIL import Image

    arr = _as_uint8_rgb(image)
    h, w = arr.shape[:2]
    new_long = int(size * max(h, w) / min(h, w))
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    if (new_h, new_w) != (h, w):
        arr = np.asarray(Image.fromarray(arr).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return arr[top:top + size, left:left + size]


def preprocess_images(images: Sequence[Any] | np.ndarray, image_size: int = 224,
                      mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """CLIPImageProcessor: images (uint8 [N, H, W, 3] or a list of HWC images of any sizes) ->
    float32 ``[N, image_size, image_size, 3]`` (NHWC), normalised."""
    out = np.empty((len(images), image_size, image_size, 3), np.float32)
    for i, image in enumerate(images):
        out[i] = (resize_center_crop(image, image_size).astype(np.float64) * (1 / 255)).astype(np.float32)
    return (out - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ----------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnums=0)
def _cosines(model: CLIPModel, params, input_ids, pixel_values):
    variables = {"params": params}
    img = model.apply(variables, pixel_values, method=CLIPModel.get_image_features).astype(jnp.float32)
    txt = model.apply(variables, input_ids, method=CLIPModel.get_text_features).astype(jnp.float32)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return jnp.sum(img * txt, axis=-1)


def _prompt_tokenizer(tokenizer: Any, max_length: int) -> PromptTokenizer:
    """A :class:`PromptTokenizer` (or a transformers CLIPTokenizer) capped at the model's positions."""
    if isinstance(tokenizer, PromptTokenizer):
        if tokenizer.max_length <= max_length:
            return tokenizer
        tokenizer = tokenizer.tokenizer
    if tokenizer is None:
        raise ValueError("clip_score needs a tokenizer (the CLIP folder has none: pass one)")
    wrapped = PromptTokenizer(tokenizer)
    return wrapped if wrapped.max_length <= max_length else PromptTokenizer(tokenizer, max_length)


def clip_scores(model: CLIPModel, params, tokenizer: Any, images: Sequence[Any] | np.ndarray,
                prompts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
    """Per-image CLIP scores ``100 * max(cos(image_i, prompt_i), 0)`` -> float32 ``[N]``, in [0, 100].

    Args:
      model, params, tokenizer: from :func:`load_clip` (tokenizer: :class:`PromptTokenizer` or a
        transformers ``CLIPTokenizer``; prompts are padded to its length, which does not change
        the embedding: attention is causal and pooling is at EOS).
      images: uint8 ``[N, H, W, 3]`` (or a list of HWC images, any sizes; floats in [0, 1] are
        rounded to uint8); preprocessed by :func:`preprocess_images`.
      prompts: N captions, ``prompts[i]`` belongs to ``images[i]``.
      batch_size: pairs per device call; the last batch is padded so one program serves all.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(images)
    if n != len(prompts):
        raise ValueError(f"{n} images but {len(prompts)} prompts: clip_score pairs image i with prompt i")
    if n == 0:
        return np.zeros((0,), np.float32)
    tok = _prompt_tokenizer(tokenizer, model.max_text_length)
    bs = max(1, min(int(batch_size), n))
    out = np.empty((n,), np.float32)
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        pixels = preprocess_images(images[start:stop], model.image_size)
        ids = tok(prompts[start:stop])
        if stop - start < bs:
            pad = bs - (stop - start)
            pixels = np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), pixels.dtype)])
            ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
        out[start:stop] = np.asarray(_cosines(model, params, jnp.asarray(ids), jnp.asarray(pixels)))[:stop - start]
    return 100.0 * np.maximum(out, 0.0)


def clip_score(model: CLIPModel, params, tokenizer: Any, images: Sequence[Any] | np.ndarray,
               prompts: Sequence[str], *, batch_size: int = 32) -> float:
    """Mean of :func:`clip_scores` over the images -> float in [0, 100]."""
    return float(np.mean(clip_scores(model, params, tokenizer, images, prompts, batch_size=batch_size)))
