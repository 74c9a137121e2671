"""Cached latents: encode a dataset once (VAE moments + text context), train from ArrayRecord shards.

Each record is a msgpack dict (``flax.serialization``) of one example: the arrays returned by
``encode_fn`` plus ``caption``. With :func:`make_encode_fn` these are ``moments`` float [h,w,2z]
(posterior mean then logvar, unscaled: training draws ``scaling_factor * sample`` afresh every
step), ``context`` float [L,D] (the frozen text encoder's conditioning, the config's hidden layer)
and ``input_ids`` int32 [L].

Layout of ``out_dir`` (per host ``p``): ``latents-<p>-<shard>.array_record`` and, once the host is
done, ``metadata-<p>.json``. Shards are written under ``out_dir/.partial-<p>/`` and renamed into
place when complete; ``progress-<p>.json`` records the data position after the last complete shard,
so an interrupted run resumes there, and readers refuse a directory whose metadata is incomplete.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from typing import Any, Callable, Sequence

import numpy as np
from flax import serialization

from ldm_jax import storage
from ldm_jax.data import pipeline, transforms

__all__ = ["encode_dataset", "ModelEncoder", "read_cache_metadata", "CachedLatentsSource", "make_latents_iterator",
           "sample_latents"]


def _writer(path: str):
    from array_record.python.array_record_module import ArrayRecordWriter

    return ArrayRecordWriter(path, "group_size:1")


def _write_json(path: str, obj: Any) -> None:
    """Atomic: readers see the old file or the new one, never a partial one."""
    storage.write_json(path, obj)


def _read_json(path: str) -> Any:
    return storage.read_json(path)


def encode_dataset(source, encode_fn: Callable[[np.ndarray, list[str]], dict], out_dir: str | os.PathLike,
                   *, image_size: int, batch_size: int = 32, num_shards: int = 1,
                   shard_size: int | None = None, dtype: str | None = None, extra_keys: Sequence[str] = (),
                   info: dict | None = None, overwrite: bool = False, progress: bool = False,
                   process_index: int | None = None, process_count: int | None = None,
                   num_threads: int = 4) -> dict:
    """Run ``encode_fn(images float32 [B,S,S,3] in [-1,1], captions) -> {name: [B, ...]}`` over one
    pass of ``source`` (this host's share, in order, centre crop, no flip) and write ArrayRecord shards.

    Shards hold ``shard_size`` examples each (rounded up to a multiple of ``batch_size``; default:
    the share split into ``num_shards``) and are the unit of resumption: a rerun with the same
    arguments continues after the last complete shard (``overwrite=True`` starts afresh), and
    returns at once when this host is done. ``dtype`` (e.g. ``"float16"``) casts floating outputs to
    save space. ``info`` (JSON-able, e.g. the model) is stored in the metadata and must match on
    resume. Corrupt examples are skipped and counted. Returns the metadata (also written to
    ``out_dir/metadata-<host>.json``).
    """
    out_dir = os.fspath(out_dir)
    storage.makedirs(out_dir)
    process_index, process_count = transforms.check_hosts(process_index, process_count)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    share = math.ceil(len(source) / process_count)
    if shard_size is None:
        shard_size = math.ceil(math.ceil(share / batch_size) / num_shards) * batch_size
    shard_size = max(1, math.ceil(shard_size / batch_size)) * batch_size  # batches never straddle shards
    signature = {"source": repr(source), "image_size": image_size, "batch_size": batch_size,
                 "shard_size": shard_size, "dtype": dtype, "extra_keys": list(extra_keys),
                 "process_count": process_count, "info": info or {}}
    signature = json.loads(json.dumps(signature))  # as it reads back from the JSON files
    host = f"{process_index:05d}"
    meta_path = storage.join(out_dir, f"metadata-{host}.json")
    progress_path = storage.join(out_dir, f"progress-{host}.json")
    # shards are written here and moved (local) or uploaded (cloud) into out_dir when complete
    partial_dir = (os.path.join(storage.CACHE_DIR, "partial", hashlib.sha1(out_dir.encode()).hexdigest()[:16], host)
                   if storage.is_remote(out_dir) else os.path.join(out_dir, f".partial-{host}"))
    if overwrite:
        shards = [storage.join(out_dir, n) for n in storage.listdir(out_dir)
                  if n.startswith(f"latents-{host}-") and n.endswith(".array_record")]
        for p in [meta_path, progress_path, *shards]:
            storage.remove(p)
        shutil.rmtree(partial_dir, ignore_errors=True)
    done = _read_json(meta_path) if storage.exists(meta_path) else None
    resume = _read_json(progress_path) if storage.exists(progress_path) else None
    for prev in (done, resume):
        if prev is not None and prev["signature"] != signature:
            raise ValueError(f"{out_dir!r} holds host {process_index}'s output of a different encoding "
                             f"({prev['signature']} != {signature}); use another directory or overwrite=True")
    if done is not None:
        return done

    ds, skip = pipeline.make_dataset(
        source, global_batch_size=batch_size * process_count, image_size=image_size, shuffle=False,
        num_epochs=1, extra_keys=extra_keys, process_index=process_index, process_count=process_count,
        drop_remainder=False, num_threads=num_threads)
    it = pipeline.DataIterator(ds, skip)
    files, count, shapes = [], 0, {}
    if resume is not None:
        it.set_state(resume["iterator"])
        files, count, shapes = resume["files"], resume["num_examples"], resume["features"]
    shutil.rmtree(partial_dir, ignore_errors=True)
    os.makedirs(partial_dir)

    from tqdm.auto import tqdm

    bar = tqdm(total=math.ceil(share / batch_size), initial=count // batch_size, unit="batch",
               desc=f"encode-dataset (host {process_index})", disable=not progress, dynamic_ncols=True)
    writer, in_shard = None, 0

    def finish_shard():  # close it, move it into place, record the data position after it
        writer.close()
        done_shard = os.path.join(partial_dir, files[-1])
        if storage.is_remote(out_dir):
            storage.copy_file(done_shard, storage.join(out_dir, files[-1]))
            os.remove(done_shard)
        else:
            os.replace(done_shard, os.path.join(out_dir, files[-1]))
        _write_json(progress_path, {"signature": signature, "iterator": it.get_state(), "files": files,
                                    "num_examples": count, "features": shapes})

    try:
        for batch in it:
            if writer is None:
                files.append(f"latents-{host}-{len(files):05d}.array_record")
                writer, in_shard = _writer(os.path.join(partial_dir, files[-1])), 0
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
                writer.write(serialization.msgpack_serialize(rec))
            count += len(captions)
            in_shard += len(captions)
            bar.update(1)
            if in_shard >= shard_size:
                finish_shard()
                writer = None
        if writer is not None:
            finish_shard()
            writer = None
    finally:
        bar.close()
        if writer is not None:  # an error: the partial shard is dropped, the progress file stays
            writer.close()
    shutil.rmtree(partial_dir, ignore_errors=True)
    meta = {"num_examples": count, "num_skipped": it.num_skipped, "skip_reasons": it.skip_reasons,
            "files": files, "features": shapes, "image_size": image_size, "source": repr(source),
            "process_index": process_index, "process_count": process_count, "info": info or {},
            "signature": signature}
    _write_json(meta_path, meta)
    storage.remove(progress_path)
    return meta


class ModelEncoder:
    """The ``encode_fn`` of :func:`encode_dataset` for a Stable Diffusion model's frozen encoders.

    ``encoder(images float32 [B,S,S,3] in [-1,1], captions) -> {"moments": float32 [B,S/f,S/f,2z],
    "context": float32 [B,L,D], "input_ids": int32 [B,L]}``: the VAE posterior's mean and (clamped)
    logvar, and the text encoder's conditioning (``config.text_encoder.hidden_layer``), both jitted;
    batches are padded to one size (no recompile for the last one) and split over ``devices``.
    ``info``: what the training side needs to know (``scaling_factor``, ``hidden_layer``, ...).
    ``loaded``: the model (anything with ``config``, ``params``, ``tokenizer_path`` and ``source``, as
    :class:`ldm_jax.convert.LoadedModel`).
    """

    def __init__(self, loaded, *, tokenizer=None, dtype=None, devices: Sequence[Any] | None = None):
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        from ldm_jax.models.autoencoder import AutoencoderKL, vae_from_config
        from ldm_jax.models.text_encoder import text_encoder_from_config
        from ldm_jax.models.tokenizer import PromptTokenizer

        cfg = loaded.config
        if tokenizer is None:
            path = loaded.tokenizer_path or cfg.get("tokenizer")
            if not path:
                raise ValueError(f"{loaded.source!r} names no tokenizer (config.tokenizer is empty): pass tokenizer=")
            tokenizer = PromptTokenizer.from_pretrained(path)
        self.tokenizer = tokenizer
        kw = {} if dtype is None else {"dtype": jnp.dtype(dtype)}
        vae = vae_from_config(dict(cfg.vae), **kw)
        text = text_encoder_from_config(dict(cfg.text_encoder), **kw)
        self.mesh = Mesh(np.array(list(devices or jax.local_devices())), ("data",))
        self._rows = NamedSharding(self.mesh, P("data"))
        params = {"vae": loaded.params["vae"], "text": loaded.params["text_encoder"]}
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))

        def moments(p, images):
            post = vae.apply({"params": p}, images.astype(vae.dtype), method=AutoencoderKL.encode)
            return jnp.concatenate([post.mean, post.logvar], axis=-1).astype(jnp.float32)

        def context(p, ids):
            return text.apply({"params": p}, ids).context.astype(jnp.float32)

        self._moments, self._context = jax.jit(moments), jax.jit(context)
        self._batch = 0  # largest batch so far: smaller ones are padded to it
        self.info = {"model": loaded.source, "scaling_factor": float(cfg.vae.get("scaling_factor", 0.18215)),
                     "latent_channels": int(cfg.vae.get("latent_channels", 4)),
                     "downsample_factor": int(vae.downsample_factor),
                     "hidden_layer": str(cfg.text_encoder.get("hidden_layer", "last")),
                     "dtype": str(jnp.dtype(dtype or jnp.float32))}

    def __call__(self, images: np.ndarray, captions: Sequence[str]) -> dict:
        import jax

        b = len(captions)
        ids = np.asarray(self.tokenizer(list(captions)), np.int32)
        n = self.mesh.devices.size
        self._batch = max(self._batch, -(-b // n) * n)

        def pad(x):
            return np.concatenate([x, np.repeat(x[-1:], self._batch - b, 0)]) if self._batch > b else x

        m = self._moments(self.params["vae"], jax.device_put(pad(np.asarray(images, np.float32)), self._rows))
        c = self._context(self.params["text"], jax.device_put(pad(ids), self._rows))
        return {"moments": np.asarray(m)[:b], "context": np.asarray(c)[:b], "input_ids": ids}


def read_cache_metadata(out_dir: str | os.PathLike) -> dict:
    """Host 0's metadata of a finished :func:`encode_dataset` folder (local or cloud), reading no shard;
    ValueError when it is missing or some host has not finished."""
    out_dir = os.fspath(out_dir)
    metas = [n for n in storage.listdir(out_dir) if n.startswith("metadata-") and n.endswith(".json")]
    if not metas:
        raise ValueError(f"CachedLatentsSource: no metadata-*.json in {out_dir!r} (not written by "
                         f"encode_dataset, or not finished: run it again to resume)")
    metadata = _read_json(storage.join(out_dir, metas[0]))
    count = int(metadata["process_count"])
    missing = [h for h in range(count) if f"metadata-{h:05d}.json" not in metas]
    if missing:
        raise ValueError(f"CachedLatentsSource: {out_dir!r} is incomplete: hosts {missing} of {count} have "
                         f"not finished encoding (run it again to resume)")
    return metadata


class CachedLatentsSource:
    """Random-access source over the shards :func:`encode_dataset` wrote (all hosts' shards).

    ``metadata``: host 0's metadata (``features``, ``image_size``, ``info``, ...). Raises when a host
    has not finished (no ``metadata-<host>.json``): rerun the encoding to complete it.
    """

    def __init__(self, out_dir: str | os.PathLike):
        import grain

        out_dir = os.fspath(out_dir)
        self.metadata = read_cache_metadata(out_dir)
        count = int(self.metadata["process_count"])
        names = [storage.join(out_dir, f"metadata-{h:05d}.json") for h in range(count)]
        # ArrayRecord reads local files: shards in cloud storage are copied to the local cache once
        self.paths = [storage.local_copy(storage.join(out_dir, f)) for name in names for f in _read_json(name)["files"]]
        if not self.paths:
            raise ValueError(f"CachedLatentsSource: no examples in {out_dir!r}")
        self.source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return serialization.msgpack_restore(self.source[index])

    def __repr__(self) -> str:
        return f"CachedLatentsSource({len(self.paths)} shards, {len(self)} examples)"


class _LatentsTransform:
    def __init__(self, keys: Sequence[str] | None):
        self.keys = None if keys is None else tuple(keys)

    def __call__(self, rec: dict, rng: np.random.Generator) -> dict:
        if self.keys is not None:
            missing = [k for k in self.keys if k not in rec]
            if missing:
                raise KeyError(f"cached record has no {missing}; it has {sorted(rec)}")
            rec = {k: rec[k] for k in self.keys}
        return {k: (v if k == "caption" else np.asarray(v)) for k, v in rec.items()}


def make_latents_iterator(out_dir_or_source, *, global_batch_size: int, seed: int = 0, shuffle: bool = True,
                          num_epochs: int | None = None, tokenizer=None, keys: Sequence[str] | None = None,
                          process_index: int | None = None, process_count: int | None = None,
                          drop_remainder: bool = True, num_threads: int = 2) -> pipeline.DataIterator:
    """Per-host resumable batches of cached records: ``{"moments": [B,...], "context": [B,...],
    "input_ids": [B,L], "caption": str [B]}`` (only ``keys`` if given; ``input_ids`` re-tokenized
    with a ``tokenizer``); same sharding/state rules as images."""
    source = (out_dir_or_source if isinstance(out_dir_or_source, CachedLatentsSource)
              else CachedLatentsSource(out_dir_or_source))
    if tokenizer is not None and keys is not None and "caption" not in keys:
        raise ValueError("make_latents_iterator: a tokenizer needs 'caption' in keys")
    ds, skip = pipeline._build(
        source, _LatentsTransform(keys), global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
        num_epochs=num_epochs, process_index=process_index, process_count=process_count,
        drop_remainder=drop_remainder, num_threads=num_threads,
        batch_fn=None if tokenizer is None else transforms.Tokenize(tokenizer), description=repr(source))
    return pipeline.DataIterator(ds, skip)


def sample_latents(moments, rng, scaling_factor: float = 0.18215):
    """``moments`` [..., 2z] (mean then logvar, NHWC) -> ``scaling_factor * (mean + std * eps)``.

    Works on numpy or jax arrays; ``rng`` is a jax PRNG key. logvar is clamped to [-30, 20] as in
    ``DiagonalGaussian``; the same draw as the trainer's for the same key.
    """
    import jax.numpy as jnp

    from ldm_jax.models.autoencoder import DiagonalGaussian

    return scaling_factor * DiagonalGaussian.from_moments(jnp.asarray(moments, jnp.float32)).sample(rng)
