"""One entry point for every model source: a diffusers folder or hub id, an original single file."""
from __future__ import annotations

import os

from ldm_jax.convert.diffusers_folder import LoadedModel, export_diffusers, load_pipeline_weights, load_single_file


def load_model(path_or_id: str | os.PathLike, *, allow_pickle: bool = False, dtype=None) -> LoadedModel:
    """Load ``path_or_id`` -> :class:`LoadedModel` (config, Flax params, tokenizer path).

    A file is an original single-file SD checkpoint (``.safetensors``; ``.ckpt`` needs
    ``allow_pickle``); a folder is a diffusers pipeline folder; anything else is a hub id.
    """
    path = os.fspath(path_or_id)
    kw = {} if dtype is None else {"dtype": dtype}
    if os.path.isfile(path):
        return load_single_file(path, allow_pickle=allow_pickle, **kw)
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") != 1
    if not os.path.isdir(path) and looks_local:
        raise FileNotFoundError(f"model {path!r} does not exist (not a file, a folder or a hub id owner/name)")
    return load_pipeline_weights(path, allow_pickle=allow_pickle, **kw)


def convert_to_diffusers(src: str, out_dir: str, *, allow_pickle: bool = False) -> str:
    """What ``ldm-jax convert`` does: load any model source and write a diffusers folder."""
    return export_diffusers(load_model(src, allow_pickle=allow_pickle), out_dir)
