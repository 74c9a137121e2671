"""Reading and writing flat weight files: safetensors, sharded safetensors, pickled PyTorch.

Every reader returns ``dict[str, np.ndarray]`` in the file's own (PyTorch) layout; floating
tensors stored as fp16/bf16 come back as float32. Key mapping lives in
:mod:`ldm_jax.convert.torch_flax` and :mod:`ldm_jax.convert.original`.

Safetensors files are parsed here (8-byte little-endian header length, JSON header, raw
little-endian data) rather than through ``safetensors.numpy``, which cannot represent bf16.
Pickled files (``.ckpt``/``.bin``/``.pt``/``.pth``) need torch and ``allow_pickle=True``:
unpickling runs arbitrary code from the file.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Any, Mapping

import numpy as np

from ldm_jax import storage
from ldm_jax.convert.torch_flax import WeightsError

__all__ = ["PICKLE_EXTENSIONS", "load_state_dict", "save_state_dict"]

PICKLE_EXTENSIONS = (".ckpt", ".bin", ".pt", ".pth")
_INDEX_SUFFIX = ".safetensors.index.json"

# safetensors dtype name -> numpy little-endian dtype (BF16 handled separately).
_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?",
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Load a flat weights file into ``{key: np.ndarray}`` (fp16/bf16 -> float32).

    Args:
      path: a ``.safetensors`` file (local or ``gs://``), a sharded ``*.safetensors.index.json``, or a pickled PyTorch
        file (``.ckpt``/``.bin``/``.pt``/``.pth``; a Lightning ``{"state_dict": ...}`` is unwrapped).
      allow_pickle: pickled files are refused unless True (unpickling runs arbitrary code).

    Raises:
      FileNotFoundError: the file (or a shard) does not exist.
      WeightsError: empty, truncated or corrupt file, unknown extension, pickle refused, no torch.
    """
    path = os.fspath(path)
    if storage.is_remote(path):  # read from a local copy (downloaded once; shards with their index)
        if not storage.isfile(path):
            raise FileNotFoundError(f"weights file {path!r} does not exist")
        if path.lower().endswith(_INDEX_SUFFIX):
            path = os.path.join(storage.local_copy(path.rsplit("/", 1)[0]), path.rsplit("/", 1)[1])
        else:
            path = storage.local_copy(path)
    if not os.path.isfile(path):
        kind = "is a directory, not a weights file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"weights file {path!r} {kind}")
    if os.path.getsize(path) == 0:
        raise WeightsError(f"weights file {path!r} is empty (0 bytes)")
    lower = path.lower()
    if lower.endswith(_INDEX_SUFFIX):
        return _load_sharded(path)
    if lower.endswith(".safetensors"):
        return _load_safetensors(path)
    if lower.endswith(PICKLE_EXTENSIONS):
        return _load_pickle(path, allow_pickle)
    raise WeightsError(
        f"weights file {path!r} has an unknown extension; expected .safetensors, "
        f"*{_INDEX_SUFFIX} or a pickled PyTorch file ({', '.join(PICKLE_EXTENSIONS)})")


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise WeightsError(f"safetensors file {path!r} is truncated: {size} bytes, no header")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise WeightsError(f"safetensors file {path!r} is truncated or corrupt: header of "
                               f"{header_len} bytes announced, file has {size} bytes")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"safetensors file {path!r} is corrupt: unreadable header ({e})") from None
        if not isinstance(header, dict):
            raise WeightsError(f"safetensors file {path!r} is corrupt: header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        data_len = size - data_start
        entries = []  # (key, begin, end, dtype, shape) of every tensor, checked
        for key, info in header.items():
            try:
                begin, end = info["data_offsets"]
                dtype, shape = info["dtype"], tuple(info["shape"])
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"safetensors file {path!r} is corrupt: bad header entry {key!r}") from None
            if end > data_len or begin > end:
                raise WeightsError(
                    f"safetensors file {path!r} is truncated: tensor {key!r} needs bytes {begin}..{end} of "
                    f"the data section, which has {data_len} bytes")
            if dtype not in _ST_DTYPES and dtype != "BF16":
                raise WeightsError(f"safetensors file {path!r}: tensor {key!r} has unsupported dtype {dtype}")
            entries.append((key, begin, end, dtype, shape))
        out: dict[str, np.ndarray] = {}
        if not entries:
            return out
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for key, begin, end, dtype, shape in entries:
                out[key] = _decode(mm[data_start + begin:data_start + end], dtype, shape, key, path)
    return out


def _decode(raw: bytes, dtype: str, shape: tuple[int, ...], key: str, path: str) -> np.ndarray:
    if dtype == "BF16":
        # bf16 is the top half of a float32.
        arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        arr = np.frombuffer(raw, _ST_DTYPES[dtype])
        if dtype == "F16":
            arr = arr.astype(np.float32)
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise WeightsError(f"safetensors file {path!r} is corrupt: tensor {key!r} has {arr.size} "
                           f"elements, shape {shape} needs {int(np.prod(shape))}")
    return arr.reshape(shape).astype(arr.dtype.newbyteorder("="), copy=True)


def _load_sharded(path: str) -> dict[str, np.ndarray]:
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise WeightsError(f"shard index {path!r} is corrupt: no readable 'weight_map' ({e!r})") from None
    folder = os.path.dirname(path)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(load_state_dict(os.path.join(folder, shard)))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise WeightsError(f"shard index {path!r} lists {len(missing)} key(s) that no shard holds: "
                           f"{', '.join(missing[:8])}")
    return out


def _load_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    if not allow_pickle:
        raise WeightsError(
            f"{path!r} is a pickled PyTorch file; unpickling runs arbitrary code stored in the file, so it "
            f"is refused by default. Pass allow_pickle=True only for a file you trust, or convert it to "
            f".safetensors first.")
    try:
        import torch
    except ImportError:
        raise WeightsError(f"reading the pickled PyTorch file {path!r} needs torch, which is not "
                           f"installed (pip install torch), or convert the file to .safetensors") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
        raise WeightsError(f"could not unpickle {path!r}: {type(e).__name__}: {e}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning / CompVis checkpoint
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.is_floating_point() and value.dtype != torch.float64:
                value = value.float()
            out[key] = value.numpy()
    return out


def state_dict_bytes(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """``{key: array}`` as the bytes of a safetensors file (``metadata`` defaults to ``{"format": "pt"}``).

    bf16 arrays (``ml_dtypes.bfloat16``, e.g. ``jnp.bfloat16``) are stored as BF16.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    blobs, offset = [], 0
    for key in sorted(state_dict):
        arr = np.ascontiguousarray(np.asarray(state_dict[key]))
        if arr.dtype.name == "bfloat16":
            name, raw = "BF16", arr.view(np.uint16).astype("<u2").tobytes()
        else:
            name = _ST_NAMES.get(arr.dtype.newbyteorder("="))
            if name is None:
                raise ValueError(f"save_state_dict: tensor {key!r} has unsupported dtype {arr.dtype}")
            raw = arr.astype(_ST_DTYPES[name]).tobytes()
        header[key] = {"dtype": name, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # data section 8-byte aligned
    return b"".join([struct.pack("<Q", len(head)), head, *blobs])


def save_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write ``{key: array}`` to ``path`` (local or a cloud URL) as safetensors, atomically
    (:func:`state_dict_bytes`)."""
    from ldm_jax import storage

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_state_dict writes .safetensors files, got {path!r}")
    storage.write_bytes(path, state_dict_bytes(state_dict, metadata))
