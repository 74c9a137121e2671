"""Textual-inversion embeddings in and out: diffusers' ``learned_embeds.safetensors`` (``{token: [D] or
[n, D]}``) and the A1111 web UI's ``.safetensors`` embeddings (``{"emb_params": [n, D]}``, named by the
file or ``token``)."""
from __future__ import annotations

import os

import numpy as np

from ldm_jax.convert.checkpoint_io import load_state_dict
from ldm_jax.convert.torch_flax import WeightsError

__all__ = ["LEARNED_EMBEDS_NAME", "read_learned_embeds", "write_learned_embeds"]

LEARNED_EMBEDS_NAME = "learned_embeds.safetensors"


def read_learned_embeds(path: str, *, token: str | None = None, weight_name: str | None = None,
                        allow_pickle: bool = False) -> tuple[str, np.ndarray]:
    """``(token, vectors [n, D] float32)`` of an embedding file (or a folder holding ``weight_name`` /
    ``learned_embeds.safetensors``). ``token`` names the placeholder (required for an A1111 file
    without one; else it replaces the file's). Raises FileNotFoundError / WeightsError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, weight_name or LEARNED_EMBEDS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"textual-inversion embedding {path!r} does not exist")
    state = load_state_dict(path, allow_pickle=allow_pickle)
    if set(state) == {"emb_params"} or "string_to_param.*" in state:  # A1111
        vectors = state.get("emb_params", state.get("string_to_param.*"))
        name = token or os.path.splitext(os.path.basename(path))[0]
    elif len(state) == 1:
        (name, vectors), = state.items()
        name = token or name
    else:
        raise WeightsError(f"textual-inversion file {path!r} holds {len(state)} tensors ({', '.join(sorted(state)[:5])}); "
                           f"expected one per file ({{token: vectors}}, or an A1111 'emb_params')")
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.shape[0]:
        raise WeightsError(f"textual-inversion file {path!r}: vectors of shape {vectors.shape}; expected [D] or [n, D]")
    return name, vectors


def write_learned_embeds(out: str, token: str, vectors) -> str:
    """Write ``{token: vectors [n, D]}`` as diffusers' textual-inversion script does; ``out`` is a
    ``.safetensors`` file or a folder (local or ``gs://``) for ``learned_embeds.safetensors``."""
    from safetensors.numpy import save

    from ldm_jax import storage

    out = os.fspath(out)
    if not out.endswith(".safetensors"):
        out = out.rstrip("/") + "/" + LEARNED_EMBEDS_NAME
    if "/" in out:
        storage.makedirs(out.rsplit("/", 1)[0])
    storage.write_bytes(out, save({token: np.ascontiguousarray(np.asarray(vectors, np.float32))},
                                  metadata={"format": "pt"}))
    return out
