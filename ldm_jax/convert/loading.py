"""One entry point for every model source: a diffusers folder or hub id, an original single file,
or a diffusion training workdir (:mod:`ldm_jax.train.workdir` owns that layout)."""
from __future__ import annotations

import os

from ldm_jax import storage
from ldm_jax.convert.diffusers_folder import LoadedModel, export_diffusers, load_pipeline_weights, load_single_file


def load_model(path_or_id: str | os.PathLike, *, allow_pickle: bool = False, dtype=None,
               step: int | None = None, ema: bool | None = None) -> LoadedModel:
    """Load ``path_or_id`` -> :class:`LoadedModel` (config, Flax params, tokenizer path).

    A file is an original single-file SD checkpoint (``.safetensors``; ``.ckpt`` needs
    ``allow_pickle``); a folder with ``checkpoints/`` is a training workdir (see
    :func:`ldm_jax.train.workdir.load_workdir`: the latest complete checkpoint, or ``step``; EMA
    weights unless ``ema=False``); another folder is a diffusers pipeline folder; anything else is a
    hub id. ``ema`` also picks the EMA/raw UNet of a single file with both; ``step`` applies to
    workdirs only. Each may be in cloud storage (``gs://``): a workdir is read in place, a file or
    diffusers folder through a local copy.
    """
    from ldm_jax.train.workdir import is_training_workdir, load_workdir  # the workdir's owner, above this layer

    path = os.fspath(path_or_id)
    kw = {} if dtype is None else {"dtype": dtype}
    if is_training_workdir(path):
        return load_workdir(path, step=step, ema=True if ema is None else bool(ema), **kw)
    if storage.is_remote(path):
        if not storage.exists(path):
            raise FileNotFoundError(f"model {path!r} does not exist")
        loaded = load_model(storage.local_copy(path), allow_pickle=allow_pickle, dtype=dtype, step=step, ema=ema)
        loaded.source = path
        return loaded
    if step is not None:
        raise ValueError(f"step={step}: {path!r} is not a training workdir (no checkpoints/ folder); "
                         f"only workdirs hold several checkpoints")
    if os.path.isfile(path):
        return load_single_file(path, allow_pickle=allow_pickle, use_ema=ema, **kw)
    if ema is not None:
        raise ValueError(f"ema={ema}: {path!r} is a diffusers folder or hub id, which holds one UNet; "
                         f"ema applies to training workdirs and single-file checkpoints")
    if not os.path.isdir(path) and not storage.looks_like_hub_id(path):
        raise FileNotFoundError(f"model {path!r} does not exist (not a file, a folder or a hub id owner/name)")
    return load_pipeline_weights(path, allow_pickle=allow_pickle, **kw)


def convert_to_diffusers(src: str, out_dir: str, *, allow_pickle: bool = False, step: int | None = None,
                         ema: bool | None = None) -> str:
    """What ``ldm-jax convert`` does: load any model source (a training workdir too) and write a diffusers folder."""
    return export_diffusers(load_model(src, allow_pickle=allow_pickle, step=step, ema=ema), out_dir)
