"""LoRA files in and out: the diffusers/PEFT layout and kohya's.

Read (:func:`read_lora`), the formats users have:

- diffusers/PEFT (``pytorch_lora_weights.safetensors``): ``unet.<module>.lora_A.weight`` ``[r, in]``
  and ``lora_B.weight`` ``[out, r]`` (``text_encoder.<module>...`` for the CLIP text encoder; no
  prefix or PEFT's ``base_model.model.`` for a bare UNet), ``lora_alpha``/``r`` (and PEFT's
  ``alpha_pattern``/``rank_pattern``) from the file's ``lora_adapter_metadata``, else alpha = rank;
  diffusers' older ``<module>.lora.down.weight``/``lora.up.weight`` with ``<module>.alpha``;
- kohya (``lora_unet_<module with _>.lora_down.weight``/``.lora_up.weight``/``.alpha``,
  ``lora_te_...`` for the text encoder).

Each becomes adapters trees (:mod:`ldm_jax.models.lora`) with ``alpha / r`` folded into ``up``:
``{"unet": tree, "text_encoder": tree}``. Module names go through the one key-mapping table
(:mod:`ldm_jax.convert.torch_flax`). Keys that name no layer of the model, wrong shapes, a missing
half of a pair, or layers other than linear / 1x1 conv are a :class:`WeightsError` listing them.

Write (:func:`write_lora`): the diffusers/PEFT layout with the metadata diffusers' loader reads.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from ldm_jax import storage
from ldm_jax.convert.checkpoint_io import load_state_dict
from ldm_jax.convert.torch_flax import WeightsError, flax_path_to_torch_key
from ldm_jax.models import lora as lora_lib

__all__ = ["LORA_WEIGHT_NAME", "METADATA_KEY", "read_lora", "write_lora", "resolve_lora_file"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
_MODELS = ("unet", "text_encoder")
_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# (suffix of the down weight, suffix of the up weight) per layout
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
          (".lora_down.weight", ".lora_up.weight"))


def _preview(items, n: int = 8) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def resolve_lora_file(path_or_id: str, weight_name: str | None = None) -> str:
    """A LoRA weights file: ``path_or_id`` itself, ``<folder>/<weight_name or pytorch_lora_weights.safetensors>``,
    or that file of a hub repo (``owner/name``, fetched with ``huggingface_hub``; the cache first)."""
    path = os.fspath(path_or_id)
    if os.path.isfile(path):
        return path
    name = weight_name or LORA_WEIGHT_NAME
    if os.path.isdir(path):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        raise FileNotFoundError(f"LoRA folder {path!r} has no {name}" +
                                (f" (it has {', '.join(found)}: pass weight_name)" if found else ""))
    if not storage.looks_like_hub_id(path) or path.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
        raise FileNotFoundError(f"LoRA file {path!r} does not exist (not a file, a folder or a hub id owner/name)")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(path, name)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, missing file: one line
        raise FileNotFoundError(f"LoRA {path!r}: could not fetch {name} from the hub ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _read_metadata(path: str) -> dict:
    if not path.lower().endswith(".safetensors"):
        return {}
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception:  # noqa: BLE001 - load_state_dict reports a damaged file
        return {}
    return json.loads(raw) if raw else {}


def _split(key: str) -> tuple[str, str, str] | None:
    """``(model or "", module, "down"/"up"/"alpha")`` of a LoRA key, or None."""
    for prefix, model in _KOHYA_PREFIX.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for kind, suffix in (("down", ".lora_down.weight"), ("up", ".lora_up.weight"), ("alpha", ".alpha")):
                if rest.endswith(suffix):
                    return "kohya:" + model, rest[: -len(suffix)], kind
            return None
    model = ""
    for m in _MODELS:
        if key.startswith(m + "."):
            model, key = m, key[len(m) + 1:]
            break
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    if key.endswith(".alpha"):
        return model, key[: -len(".alpha")], "alpha"
    for down, up in _PAIRS:
        if key.endswith(down):
            return model, key[: -len(down)], "down"
        if key.endswith(up):
            return model, key[: -len(up)], "up"
    return None


def _linear_layers(params: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], tuple[int, int]]]:
    """``{torch module name: (flax layer path, (in, out))}`` of the linear / 1x1 conv layers of ``params``."""
    return {flax_path_to_torch_key(path + ("kernel",))[: -len(".weight")]: (path, shape)
            for path, shape in lora_lib.linear_layers(params, [""]).items()}


def _as_matrix(w: np.ndarray, key: str) -> np.ndarray:
    if w.ndim == 4:
        if w.shape[2:] != (1, 1):
            raise WeightsError(f"LoRA key {key}: a {w.shape[2]}x{w.shape[3]} conv adapter (LoCon); only linear "
                               f"and 1x1 conv layers are supported")
        w = w[:, :, 0, 0]
    if w.ndim != 2:
        raise WeightsError(f"LoRA key {key}: expected a matrix, got shape {tuple(w.shape)}")
    return w


def read_lora(path_or_id: str, params: Mapping[str, Mapping[str, Any]], *, weight_name: str | None = None,
              allow_pickle: bool = False) -> dict[str, dict]:
    """Read a LoRA file for the models of ``params`` (``{"unet": params, "text_encoder": params}``, arrays
    or ShapeDtypeStructs) -> ``{"unet": adapters, "text_encoder": adapters}`` (float32 numpy, ``alpha/r``
    folded into ``up``; a model without adapters gets ``{}``).

    Raises:
      FileNotFoundError: no such file, folder or hub file.
      WeightsError: a damaged file, a pickle without ``allow_pickle``, keys that are not LoRA weights
        or name no layer of these models, wrong shapes (another architecture), unpaired halves.
    """
    path = resolve_lora_file(path_or_id, weight_name)
    state = load_state_dict(path, allow_pickle=allow_pickle)
    if not state:
        raise WeightsError(f"LoRA file {path!r} holds no tensors")
    meta = _read_metadata(path)
    layers = {m: _linear_layers(params[m]) for m in _MODELS if params.get(m)}
    kohya = {m: {name.replace(".", "_"): name for name in layers[m]} for m in layers}
    found: dict[tuple[str, str], dict] = {}
    unknown, unmatched = [], []
    for key, value in state.items():
        parts = _split(key)
        if parts is None:
            unknown.append(key)
            continue
        model, module, kind = parts
        if model.startswith("kohya:"):
            model = model[len("kohya:"):]
            name = kohya.get(model, {}).get(module)
            if name is None and model == "text_encoder":
                name = kohya.get(model, {}).get("text_model_" + module)
        else:
            if not model:  # a bare adapter file: the UNet's, unless only the text encoder has the module
                model = "unet" if module in layers.get("unet", {}) or "text_model." not in module else "text_encoder"
            table = layers.get(model, {})
            name = module if module in table else ("text_model." + module if "text_model." + module in table else None)
        if name is None:
            unmatched.append(key)
            continue
        found.setdefault((model, name), {})[kind] = (key, np.asarray(value, np.float32))
    if unknown:
        raise WeightsError(f"LoRA file {path!r}: {len(unknown)} key(s) are not LoRA weights of a known layout "
                           f"(diffusers/PEFT lora_A/lora_B, kohya lora_down/lora_up): {_preview(unknown)}")
    if unmatched:
        raise WeightsError(f"LoRA file {path!r}: {len(unmatched)} key(s) name no linear layer of this model "
                           f"(a LoRA of another architecture?): {_preview(unmatched)}")
    out: dict[str, dict] = {m: {} for m in _MODELS}
    bad = []
    for (model, name), parts in sorted(found.items()):
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            bad.append(f"{next(iter(parts.values()))[0]} has no {missing} weight")
            continue
        (kd, down), (ku, up) = parts["down"], parts["up"]
        down, up = _as_matrix(down, kd), _as_matrix(up, ku)  # torch: down [r, in], up [out, r]
        flax_path, (d_in, d_out) = layers[model][name]
        r = down.shape[0]
        if down.shape != (r, d_in) or up.shape != (d_out, r):
            bad.append(f"{kd}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the layer's "
                       f"[in {d_in}, out {d_out}]")
            continue
        alpha = _alpha(meta, model, name, r, parts.get("alpha"))
        out[model][flax_path] = {"down": down.T.copy(), "up": (up.T * (alpha / r)).astype(np.float32)}
    if bad:
        raise WeightsError(f"LoRA file {path!r} does not fit this model: {_preview(bad, 4)}")
    if not any(out.values()):
        raise WeightsError(f"LoRA file {path!r} holds no adapter for these models")
    return {m: traverse_util.unflatten_dict({p + (k,): v for p, a in layers_.items() for k, v in a.items()})
            for m, layers_ in out.items()}


def _alpha(meta: dict, model: str, name: str, rank: int, alpha_entry) -> float:
    if alpha_entry is not None:  # per-layer alpha (kohya, diffusers' network alphas)
        return float(np.asarray(alpha_entry[1]).reshape(-1)[0])
    conf = {k[len(model) + 1:]: v for k, v in meta.items() if k.startswith(model + ".")} or meta
    if "lora_alpha" not in conf:
        return float(rank)  # diffusers' default when a file says nothing: scale 1
    for pattern, value in (conf.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", name) or re.fullmatch(pattern, name):
            return float(value)
    return float(conf["lora_alpha"])


def write_lora(path: str, adapters: Mapping[str, Mapping[str, Any]], *, rank: int, alpha: float,
               dropout: float = 0.0, base: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """Write ``{"unet": adapters, "text_encoder": adapters}`` (raw: ``alpha/r`` not folded) as diffusers'
    ``save_lora_weights`` does: ``unet.<module>.lora_A.weight [r, in]`` / ``lora_B.weight [out, r]`` and
    ``lora_adapter_metadata`` with ``r``, ``lora_alpha``, ``lora_dropout`` and ``target_modules`` per model.
    ``base``: the models' params (or shapes), needed to write adapters of 1x1 conv layers (SD v1's
    ``proj_in``/``proj_out``) as ``[r, in, 1, 1]`` / ``[out, r, 1, 1]``. ``path``: a ``.safetensors``
    file, or a folder (local or ``gs://``) to hold ``pytorch_lora_weights.safetensors``. Returns the file."""
    from safetensors.numpy import save

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        path = path.rstrip("/") + "/" + LORA_WEIGHT_NAME
    tensors, meta = {}, {}
    for model, tree in adapters.items():
        if not tree:
            continue
        flat_base = traverse_util.flatten_dict(dict(base[model])) if base and base.get(model) else {}
        names = []
        for layer, a in lora_lib.adapter_layers(tree).items():
            name = flax_path_to_torch_key(layer + ("kernel",))[: -len(".weight")]
            if model == "text_encoder" and name.startswith("text_model."):
                name = name[len("text_model."):]  # transformers 5's CLIPTextModel module names (diffusers writes them)
            down, up = np.asarray(a["down"], np.float32).T, np.asarray(a["up"], np.float32).T
            kernel = flat_base.get(layer + ("kernel",))
            if kernel is not None and len(kernel.shape) == 4:
                down, up = down[:, :, None, None], up[:, :, None, None]
            tensors[f"{model}.{name}.lora_A.weight"] = np.ascontiguousarray(down)
            tensors[f"{model}.{name}.lora_B.weight"] = np.ascontiguousarray(up)
            names.append(name)
        meta.update({f"{model}.r": int(rank), f"{model}.lora_alpha": float(alpha),
                     f"{model}.lora_dropout": float(dropout), f"{model}.target_modules": sorted(names),
                     f"{model}.init_lora_weights": "gaussian"})
    if not tensors:
        raise ValueError("no adapters to write")
    if "/" in path:
        storage.makedirs(path.rsplit("/", 1)[0])
    storage.write_bytes(path, save(tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)}))
    return path
