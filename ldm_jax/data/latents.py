"""Cached latents: encode a dataset once (VAE moments + text context), train from ArrayRecord shards.

Each record is a msgpack dict (``flax.serialization``) of one example: the arrays returned by
``encode_fn`` (e.g. ``moments`` [h,w,2z], ``context`` [77,D]) plus ``caption``. Shards are
``latents-<host>-<shard>.array_record`` in ``out_dir``, with ``metadata-<host>.json``.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Sequence

import numpy as np
from flax import serialization

from ldm_jax.data import pipeline

__all__ = ["encode_dataset", "CachedLatentsSource", "make_latents_iterator", "sample_latents"]


def _writer(path: str):
    from array_record.python.array_record_module import ArrayRecordWriter

    return ArrayRecordWriter(path, "group_size:1")


def encode_dataset(source, encode_fn: Callable[[np.ndarray, list[str]], dict], out_dir: str | os.PathLike,
                   *, image_size: int, batch_size: int = 32, num_shards: int = 1,
                   dtype: str | None = None, extra_keys: Sequence[str] = (),
                   process_index: int | None = None, process_count: int | None = None,
                   num_threads: int = 4) -> dict:
    """Run ``encode_fn(images float32 [B,S,S,3] in [-1,1], captions) -> {name: [B, ...]}`` over one
    pass of ``source`` (this host's share, in order, centre crop, no flip) and write ArrayRecord shards.

    ``dtype`` (e.g. ``"float16"``) casts floating outputs to save space. Corrupt examples are skipped
    and counted. Returns the metadata (also written to ``out_dir/metadata-<host>.json``).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    process_index, process_count = pipeline._check_hosts(process_index, process_count)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    ds, skip = pipeline.make_dataset(
        source, global_batch_size=batch_size * process_count, image_size=image_size, shuffle=False,
        num_epochs=1, extra_keys=extra_keys, process_index=process_index, process_count=process_count,
        drop_remainder=False, num_threads=num_threads)
    it = pipeline.DataIterator(ds, skip)
    paths = [os.path.join(out_dir, f"latents-{process_index:05d}-{s:05d}.array_record") for s in range(num_shards)]
    writers = [_writer(p) for p in paths]
    count, shapes = 0, {}
    try:
        for batch in it:
            captions = [str(c) for c in batch["caption"]]
            out = encode_fn(batch["image"], captions)
            if not isinstance(out, dict) or not out:
                raise ValueError(f"encode_fn must return a non-empty dict of arrays, got {type(out).__name__}")
            out = {k: np.asarray(v) for k, v in out.items()}
            for k, v in out.items():
                if v.shape[:1] != (len(captions),):
                    raise ValueError(f"encode_fn output {k!r} has shape {v.shape}; expected leading dim {len(captions)}")
                if dtype is not None and np.issubdtype(v.dtype, np.floating):
                    out[k] = v.astype(dtype)
                shapes[k] = [list(out[k].shape[1:]), str(out[k].dtype)]
            for i, caption in enumerate(captions):
                rec = {k: v[i] for k, v in out.items()}
                rec["caption"] = caption
                for k in extra_keys:
                    rec[k] = np.asarray(batch[k][i])
                writers[count % num_shards].write(serialization.msgpack_serialize(rec))
                count += 1
    finally:
        for w in writers:
            w.close()
    meta = {"num_examples": count, "num_skipped": it.num_skipped, "skip_reasons": it.skip_reasons,
            "files": [os.path.basename(p) for p in paths], "features": shapes, "image_size": image_size,
            "source": repr(source), "process_index": process_index, "process_count": process_count}
    with open(os.path.join(out_dir, f"metadata-{process_index:05d}.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


class CachedLatentsSource:
    """Random-access source over the shards ``encode_dataset`` wrote (all hosts' shards)."""

    def __init__(self, out_dir: str | os.PathLike):
        import grain

        paths = sorted(glob.glob(os.path.join(os.fspath(out_dir), "latents-*.array_record")))
        if not paths:
            raise ValueError(f"CachedLatentsSource: no latents-*.array_record files in {os.fspath(out_dir)!r}")
        self.paths = paths
        self.source = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return serialization.msgpack_restore(self.source[index])

    def __repr__(self) -> str:
        return f"CachedLatentsSource({len(self.paths)} shards, {len(self)} examples)"


class _LatentsTransform:
    def __call__(self, rec: dict, rng: np.random.Generator) -> dict:
        return {k: (v if k == "caption" else np.asarray(v)) for k, v in rec.items()}


def make_latents_iterator(out_dir_or_source, *, global_batch_size: int, seed: int = 0, shuffle: bool = True,
                          num_epochs: int | None = None, tokenizer=None, process_index: int | None = None,
                          process_count: int | None = None, drop_remainder: bool = True,
                          num_threads: int = 2) -> pipeline.DataIterator:
    """Per-host resumable batches of cached records: ``{"moments": [B,...], "context": [B,...],
    "caption": str [B], ("input_ids" with a tokenizer)}``; same sharding/state rules as images."""
    source = (out_dir_or_source if isinstance(out_dir_or_source, CachedLatentsSource)
              else CachedLatentsSource(out_dir_or_source))
    ds, skip = pipeline._build(
        source, _LatentsTransform(), global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
        num_epochs=num_epochs, process_index=process_index, process_count=process_count,
        drop_remainder=drop_remainder, num_threads=num_threads,
        batch_fn=None if tokenizer is None else pipeline._Tokenize(tokenizer), description=repr(source))
    return pipeline.DataIterator(ds, skip)


def sample_latents(moments, rng, scaling_factor: float = 0.18215):
    """``moments`` [..., 2z] (mean then logvar, NHWC) -> ``scaling_factor * (mean + std * eps)``.

    Works on numpy or jax arrays; ``rng`` is a jax PRNG key. logvar is clamped to [-30, 20] as in
    ``DiagonalGaussianDistribution``.
    """
    import jax
    import jax.numpy as jnp

    mean, logvar = jnp.split(jnp.asarray(moments, jnp.float32), 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    return scaling_factor * (mean + std * jax.random.normal(rng, mean.shape, mean.dtype))
