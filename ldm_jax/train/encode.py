"""Caching a dataset's latents with a model's frozen encoders: the Python API behind
``ldm-jax encode-dataset`` (train with ``--config.data.cached_latents=OUT``)."""
from __future__ import annotations

import os

from ldm_jax.convert import load_model
from ldm_jax.data.latents import ModelEncoder, encode_dataset
from ldm_jax.data.sources import source_from_spec

__all__ = ["make_encode_fn", "encode_dataset_with_model"]


def make_encode_fn(model, **kwargs) -> ModelEncoder:
    """:class:`~ldm_jax.data.latents.ModelEncoder` for ``model`` (a :class:`~ldm_jax.convert.LoadedModel`
    or anything :func:`~ldm_jax.convert.load_model` loads); ``kwargs``: ``tokenizer``, ``dtype``, ``devices``."""
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    return ModelEncoder(model, **kwargs)


def encode_dataset_with_model(model, source, out_dir: str | os.PathLike, *, image_size: int | None = None,
                              batch_size: int = 32, split: str = "train", shard_size: int | None = 2048,
                              dtype: str | None = None, compute_dtype: str | None = None,
                              overwrite: bool = False, progress: bool = True, num_threads: int = 4) -> dict:
    """What ``ldm-jax encode-dataset`` does: :func:`~ldm_jax.data.latents.encode_dataset` with
    :func:`make_encode_fn`.

    ``model``: model path / hub id / workdir or a ``LoadedModel``; ``source``: a source object or a
    spec for :func:`~ldm_jax.data.sources.source_from_spec` (with ``split``); ``image_size``:
    default the VAE's ``sample_size``.
    """
    loaded = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    enc = ModelEncoder(loaded, dtype=compute_dtype)
    if isinstance(source, str):
        source = source_from_spec(source, split=split)
    if image_size is None:
        size = loaded.config.vae.get("sample_size")
        if size is None:
            raise ValueError("the model's VAE config has no sample_size: pass image_size")
        image_size = size[0] if isinstance(size, (list, tuple)) else size
    return encode_dataset(source, enc, out_dir, image_size=int(image_size), batch_size=batch_size,
                          shard_size=shard_size, dtype=dtype, info=enc.info, overwrite=overwrite,
                          progress=progress, num_threads=num_threads)
