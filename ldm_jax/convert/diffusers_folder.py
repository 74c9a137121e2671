"""Whole Stable Diffusion models in and out: diffusers folders / hub ids and original single files.

* :func:`load_pipeline_weights` reads a diffusers pipeline folder (``model_index.json``, ``unet/``,
  ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or a hub id.
* :func:`load_single_file` reads an original CompVis/Stability checkpoint (v1, v2, inpainting).
* :func:`export_diffusers` writes a folder that diffusers/transformers ``from_pretrained`` load.

All three return / take a :class:`LoadedModel`: the ConfigDict (same layout as ``configs/sd_v1.py``)
and the Flax params of ``unet``, ``vae`` and ``text_encoder`` (numpy arrays, NHWC conv kernels).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.convert import original as original_layout
from ldm_jax.convert.checkpoint_io import load_state_dict, save_state_dict
from ldm_jax.convert.torch_flax import WeightsError, flax_to_torch, torch_to_flax

__all__ = ["LoadedModel", "SUPPORTED_PIPELINES", "load_pipeline_weights", "load_single_file",
           "export_diffusers", "build_configs_and_shapes"]

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                       "StableDiffusionInpaintPipeline", "StableDiffusionInpaintPipelineLegacy")
_COMPONENT_CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
                      "text_encoder": ("CLIPTextModel",)}
_SCHEDULER_FIELDS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                     "steps_offset")
# Module attributes that are runtime choices, not part of a checkpoint's config.
_RUNTIME_FIELDS = {"dtype", "param_dtype", "attention_impl", "attention_chunk_size", "remat",
                   "gradient_checkpointing", "parent", "name"}
_HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json",
                 "scheduler/*", "tokenizer/*"]


@dataclasses.dataclass
class LoadedModel:
    """A loaded SD model: ``config`` (ConfigDict like ``configs/sd_v1.py``), ``params`` (``{'unet',
    'vae', 'text_encoder'}`` -> Flax param trees) and the tokenizer folder (None: use ``config.tokenizer``)."""

    config: ml_collections.ConfigDict
    params: dict
    tokenizer_path: str | None = None
    source: str = ""


# ----------------------------------------------------------------------------------------- models
def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _module_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - _RUNTIME_FIELDS


def _build(kind: str, cfg: Mapping[str, Any], source: str):
    """(module, filtered config dict, ``jax.eval_shape`` params) for one network; ValueError -> WeightsError."""
    from ldm_jax.models.autoencoder import AutoencoderKL, vae_from_config
    from ldm_jax.models.text_encoder import config_fields, text_encoder_from_config
    from ldm_jax.models.unet import UNet2DConditionModel, unet_from_config

    cfg = {k: _tuples(v) for k, v in dict(cfg).items()}
    try:
        if kind == "unet":
            model = unet_from_config(cfg)
            fields = _module_fields(UNet2DConditionModel)
            side = 2 ** (len(model.block_out_channels) - 1)
            ctx = model.cross_attention_dim
            ctx = ctx[0] if isinstance(ctx, (tuple, list)) else ctx
            args = (jnp.zeros((1, side, side, model.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, ctx)))
        elif kind == "vae":
            model = vae_from_config(cfg)
            fields = _module_fields(AutoencoderKL)
            side = 2 ** (len(model.block_out_channels) - 1)
            args = (jnp.zeros((1, side, side, model.in_channels)),)
        else:
            model = text_encoder_from_config(cfg)
            fields = (_module_fields(type(model)) | {"model_type"}) & set(config_fields(cfg))
            args = (jnp.zeros((1, 1), jnp.int32),)
        shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{source}: unsupported {kind} config: {e}") from None
    return model, {k: v for k, v in cfg.items() if k in fields}, shapes


def build_configs_and_shapes(configs: Mapping[str, Mapping[str, Any]], source: str = "config"):
    """``{'unet','vae','text_encoder'}`` configs (or some of them) -> (filtered configs, ``jax.eval_shape``
    param trees)."""
    out_cfg, out_shapes = {}, {}
    for kind in ("unet", "vae", "text_encoder"):
        if kind in configs:
            _, out_cfg[kind], out_shapes[kind] = _build(kind, configs[kind], source)
    return out_cfg, out_shapes


def _to_flax(kind: str, state_dict: Mapping[str, np.ndarray], shapes, source: str, dtype) -> dict:
    ignore: tuple[str, ...] = ()
    if kind == "text_encoder":
        ignore = (r"position_ids$",)
        if state_dict and not any(k.startswith("text_model.") for k in state_dict):
            state_dict = {f"text_model.{k}": v for k, v in state_dict.items()}
    elif kind == "vae":
        state_dict = _modern_vae_names(state_dict)
    return torch_to_flax(state_dict, shapes, source=source, ignore=ignore,
                         dtype=None if dtype is None else jnp.dtype(dtype))


_LEGACY_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_vae_names(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old diffusers VAE attention names (``attentions.0.query``) -> current (``attentions.0.to_q``)."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if len(parts) >= 2 and "attentions" in parts and parts[-2] in _LEGACY_VAE_ATTN:
            key = ".".join(parts[:-2] + [_LEGACY_VAE_ATTN[parts[-2]], parts[-1]])
        out[key] = value
    return out


def _make_config(name: str, configs: Mapping[str, Mapping], scheduler: Mapping, tokenizer) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.unet = dict(configs["unet"])
    c.vae = dict(configs["vae"])
    c.text_encoder = dict(configs["text_encoder"])
    c.tokenizer = tokenizer
    # Keep every scheduler option (timestep_spacing, set_alpha_to_one, ...): samplers take what they know.
    # Keys diffusers marks as defaults (`_use_default_values`) are dropped, as diffusers does when
    # another scheduler class is built from this config.
    defaults = set(scheduler.get("_use_default_values", ()))
    c.scheduler = {k: v for k, v in scheduler.items() if not k.startswith("_") and k not in defaults}
    size = int(configs["vae"].get("sample_size") or 8 * int(configs["unet"].get("sample_size") or 64))
    v_pred = c.scheduler.get("prediction_type") == "v_prediction"
    c.sample = dict(height=size, width=size, num_inference_steps=50, guidance_scale=9.0 if v_pred else 7.5,
                    sampler="ddim")
    return c


# ----------------------------------------------------------------------------------------- diffusers folders
def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path!r} is not valid JSON: {e}") from None


def _weights_file(folder: str, base: str, variant: str | None) -> str:
    names = [f"{base}.safetensors", f"{base}.safetensors.index.json", f"{base}.fp16.safetensors",
             f"{base}.bin", f"{base}.fp16.bin"]
    if variant:
        names = [f"{base}.{variant}.safetensors", f"{base}.safetensors.index.{variant}.json",
                 f"{base}.{variant}.bin"] + names
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no weights in {folder!r}: looked for {', '.join(names)}")


def _resolve(path_or_hub_id: str | os.PathLike) -> str:
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise WeightsError(f"{path!r} is a file; load_pipeline_weights takes a diffusers folder or hub id "
                           f"(use load_single_file for an original .ckpt/.safetensors)")
    looks_like_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and all(path.split("/"))
    if not looks_like_id:
        raise FileNotFoundError(f"{path!r} is neither an existing folder nor a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 - hub errors have many types (offline, 404, auth)
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set, and the model is not in the local cache)" if offline else ""
        raise WeightsError(f"{path!r} is not a local folder and could not be downloaded from the Hugging "
                           f"Face Hub{hint}: {type(e).__name__}: {e}") from None


def load_pipeline_weights(path_or_hub_id: str | os.PathLike, dtype: Any = jnp.float32, *,
                          allow_pickle: bool = False, variant: str | None = None) -> LoadedModel:
    """Load a diffusers Stable Diffusion folder (or hub id) into Flax params.

    Args:
      path_or_hub_id: a folder with ``model_index.json`` or a hub id (``owner/name``, downloaded).
      dtype: dtype of the returned params (weights stored as fp16/bf16 are read as float32 first).
      allow_pickle: accept ``.bin`` weights (unpickling runs arbitrary code; see ``load_state_dict``).
      variant: prefer ``<name>.<variant>.safetensors`` files (e.g. ``"fp16"``).

    Raises:
      WeightsError: unsupported pipeline/component/config, weights that do not fit, download failure.
      FileNotFoundError: missing folder, ``model_index.json``, config or weights.
    """
    folder = _resolve(path_or_hub_id)
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{folder!r} is not a diffusers pipeline folder: no model_index.json")
    index = _read_json(index_path)
    pipeline = index.get("_class_name")
    if pipeline not in SUPPORTED_PIPELINES:
        raise WeightsError(f"{index_path}: unsupported pipeline {pipeline!r}; ldm_jax loads "
                           f"{', '.join(SUPPORTED_PIPELINES)}")
    for comp, classes in _COMPONENT_CLASSES.items():
        entry = index.get(comp)
        if not entry or entry[-1] not in classes:
            raise WeightsError(f"{index_path}: component {comp!r} is {entry!r}; ldm_jax supports {classes}")

    configs, params = {}, {}
    for comp, base in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        sub = os.path.join(folder, comp)
        raw_cfg = _read_json(os.path.join(sub, "config.json"))
        if comp == "text_encoder":
            raw_cfg.setdefault("hidden_layer", "last")  # a diffusers SD v2 encoder already stops at the penultimate layer
        _, configs[comp], shapes = _build(comp, raw_cfg, os.path.join(sub, "config.json"))
        wpath = _weights_file(sub, base, variant)
        sd = load_state_dict(wpath, allow_pickle=allow_pickle)
        params[comp] = _to_flax(comp, sd, shapes, wpath, dtype)

    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    scheduler = _read_json(sched_path) if os.path.isfile(sched_path) else {}
    tok = os.path.join(folder, "tokenizer")
    tokenizer_path = tok if os.path.isdir(tok) else None
    name = os.path.basename(os.path.normpath(os.fspath(path_or_hub_id)))
    config = _make_config(name, configs, scheduler, tokenizer_path)
    return LoadedModel(config, params, tokenizer_path, os.fspath(path_or_hub_id))


# ----------------------------------------------------------------------------------------- original single file
_TOKENIZERS = {"v1": "openai/clip-vit-large-patch14", "v2": "stabilityai/stable-diffusion-2-1"}


def load_single_file(path: str | os.PathLike, allow_pickle: bool = False, *, dtype: Any = jnp.float32,
                     use_ema: bool | None = None, prediction_type: str | None = None,
                     unet_config: Mapping[str, Any] | None = None, vae_config: Mapping[str, Any] | None = None,
                     text_encoder_config: Mapping[str, Any] | None = None) -> LoadedModel:
    """Load an original CompVis/Stability checkpoint (``.safetensors``, or ``.ckpt`` with allow_pickle).

    v1/v2 and inpainting are detected, the configs inferred from the tensor shapes
    (:func:`ldm_jax.convert.original.infer_configs`); ``*_config`` entries override inferred fields
    (e.g. heads or ``norm_num_groups``, which shapes do not show). ``use_ema``: default takes the
    ``model_ema.*`` UNet when the file has more than 100 such keys. ``config.tokenizer`` names the
    hub tokenizer of the detected version.
    """
    path = os.fspath(path)
    sd = load_state_dict(path, allow_pickle=allow_pickle)
    inferred = original_layout.infer_configs(sd, prediction_type=prediction_type)
    kind = inferred["kind"]
    for name, override in (("unet", unet_config), ("vae", vae_config), ("text_encoder", text_encoder_config)):
        if not inferred[name]:
            raise WeightsError(f"{path}: no {name} weights in the checkpoint (an original SD file holds "
                               f"UNet, VAE and text encoder)")
        inferred[name].update(override or {})
    configs, shapes = build_configs_and_shapes(inferred, path)
    parts = original_layout.original_to_diffusers(sd, configs["unet"], configs["vae"], use_ema=use_ema)
    params = {name: _to_flax(name, parts[name], shapes[name], f"{path} ({name})", dtype)
              for name in ("unet", "vae", "text_encoder")}
    config = _make_config(os.path.splitext(os.path.basename(path))[0], configs, inferred["scheduler"],
                          _TOKENIZERS[kind["version"]])
    return LoadedModel(config, params, None, path)


# ----------------------------------------------------------------------------------------- export
def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # noqa: BLE001 - diffusers is optional
        return "0.30.0"


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_json(path: str, obj: Mapping) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({k: _jsonable(v) for k, v in obj.items()}, f, indent=2, sort_keys=False)
        f.write("\n")


def export_diffusers(model: LoadedModel | tuple[Mapping, Mapping], out_dir: str | os.PathLike, *,
                     dtype: Any = np.float32) -> str:
    """Write a diffusers pipeline folder (``StableDiffusionPipeline`` or the inpainting one).

    Args:
      model: a :class:`LoadedModel`, or ``(params, config)`` with ``params`` = ``{'unet','vae',
        'text_encoder'}`` Flax trees and ``config`` a ConfigDict/dict like ``configs/sd_v1.py``.
      out_dir: created if needed; ``unet/``, ``vae/``, ``text_encoder/`` (safetensors + config.json),
        ``scheduler/scheduler_config.json``, ``model_index.json`` and ``tokenizer/`` (copied from
        ``tokenizer_path`` or a local ``config.tokenizer`` folder when there is one).
      dtype: dtype of the written weights (float32 default; ``np.float16``, ``jnp.bfloat16``).

    Returns:
      ``out_dir``.
    """
    if isinstance(model, LoadedModel):
        params, config, tok = model.params, model.config, model.tokenizer_path
    else:
        params, config = model
        tok = None
    config = dict(config) if not isinstance(config, ml_collections.ConfigDict) else config.to_dict()
    if tok is None and isinstance(config.get("tokenizer"), str) and os.path.isdir(config["tokenizer"]):
        tok = config["tokenizer"]
    missing = [k for k in ("unet", "vae", "text_encoder") if k not in params or k not in config]
    if missing:
        raise ValueError(f"export_diffusers: params and config need {missing}")
    if dict(config["text_encoder"]).get("model_type") == "ldmbert":
        raise ValueError("export_diffusers: this model conditions on LDM's BERT text encoder, which a diffusers "
                         "StableDiffusionPipeline folder cannot hold; sample it from its training workdir")
    if dict(config["unet"]).get("ignore_zero_context"):
        raise ValueError("export_diffusers: this UNet leaves all-zero context vectors out of its cross-attention "
                         "(unet.ignore_zero_context), which diffusers' UNet2DConditionModel does not")
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    version = _diffusers_version()
    np_dtype = jnp.dtype(dtype)

    def write(comp: str, weights_name: str, cfg: dict) -> None:
        os.makedirs(os.path.join(out, comp), exist_ok=True)
        sd = {k: (v.astype(np_dtype) if np.issubdtype(v.dtype, np.floating) else v)
              for k, v in flax_to_torch(jax.device_get(params[comp])).items()}
        save_state_dict(sd, os.path.join(out, comp, weights_name))
        _write_json(os.path.join(out, comp, "config.json"), cfg)

    unet_cfg = dict(config["unet"])
    write("unet", "diffusion_pytorch_model.safetensors",
          {"_class_name": "UNet2DConditionModel", "_diffusers_version": version, **unet_cfg})
    vae_cfg = dict(config["vae"])
    n = len(vae_cfg["block_out_channels"])
    vae_cfg = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
               **{k: v for k, v in vae_cfg.items() if v is not None}}
    write("vae", "diffusion_pytorch_model.safetensors",
          {"_class_name": "AutoencoderKL", "_diffusers_version": version, **vae_cfg})
    text_cfg = dict(config["text_encoder"])
    write("text_encoder", "model.safetensors",
          {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
           "torch_dtype": str(np_dtype) if np_dtype.name != "bfloat16" else "bfloat16", **text_cfg})

    sched = dict(config.get("scheduler") or {})
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    _write_json(os.path.join(out, "scheduler", "scheduler_config.json"),
                {"_class_name": "PNDMScheduler", "_diffusers_version": version, "skip_prk_steps": True,
                 "set_alpha_to_one": False, "clip_sample": False, **sched})
    index = {"_class_name": "StableDiffusionInpaintPipeline" if unet_cfg.get("in_channels") == 9
             else "StableDiffusionPipeline",
             "_diffusers_version": version, "feature_extractor": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if tok is not None:
        dst = os.path.join(out, "tokenizer")
        if os.path.abspath(tok) != os.path.abspath(dst):
            shutil.copytree(tok, dst, dirs_exist_ok=True)
    else:
        index["tokenizer"] = [None, None]
    _write_json(os.path.join(out, "model_index.json"), index)
    return out
