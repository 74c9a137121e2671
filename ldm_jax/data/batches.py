"""Training batches from a data config: the one place that turns ``config.data`` into an iterator.

Every trainer asks :func:`make_batches` for this process's rows of each global batch. The iterator
has ``get_state()``/``set_state()`` (small JSON-able dicts, saved with each checkpoint), so a
resumed run continues with the very next batch. Batches hold numeric arrays only:

- ``image`` float32 ``[b, S, S, 3]`` in [-1, 1] (or ``latents``/``moments`` for latent sources),
- ``input_ids`` int32 ``[b, L]`` when captions are asked for (``tokenizer`` or the synthetic ids),
- ``context`` float32 ``[b, L, D]`` from cached latents that hold the text encoder's output.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ldm_jax.data.latents import CachedLatentsSource, make_latents_iterator
from ldm_jax.data.pipeline import make_iterator
from ldm_jax.data.sources import make_source
from ldm_jax.data.synthetic import SyntheticCaptions

__all__ = ["make_batches", "NumericBatches"]

SYNTHETIC = ("synthetic", "synthetic_latents")


class NumericBatches:
    """Keeps the numeric arrays of an iterator's batches (drops captions and other strings);
    forwards ``get_state``/``set_state``."""

    def __init__(self, inner, keys: Sequence[str] | None = None):
        self.inner, self.keys = inner, None if keys is None else tuple(keys)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.inner)
        keys = self.keys or [k for k, v in batch.items() if np.asarray(v).dtype.kind not in "USO"]
        return {k: np.asarray(batch[k]) for k in keys}

    def get_state(self) -> Any:
        return self.inner.get_state()

    def set_state(self, state: Any) -> None:
        self.inner.set_state(state)


def make_batches(data, *, global_batch_size: int, image_size: int, rows: tuple[int, int], tokenizer=None,
                 captions: bool = True, text_length: int = 77, vocab_size: int = 1000, latent_channels: int = 4,
                 workdir: str | None = None):
    """This process's rows ``[start, stop)`` of every global batch that ``data`` (``config.data``) names.

    - ``data.cached_latents`` (a folder of ``ldm-jax encode-dataset``): VAE moments, text context and
      ids; it must have been encoded at ``image_size`` px;
    - ``data.source`` ``synthetic`` / ``synthetic_latents``: :class:`~ldm_jax.data.synthetic.SyntheticCaptions`
      (images at ``image_size`` px, or latents at ``image_size`` with ``latent_channels``);
    - any source of :func:`~ldm_jax.data.sources.make_source`: the grain pipeline, captions tokenized
      with ``tokenizer`` when ``captions`` (diffusion), images only otherwise (autoencoder).

    ``rows`` must be this process's equal share of the batch (:func:`ldm_jax.train.sharding.local_batch_rows`);
    the synthetic source can produce any rows, the others give process ``p`` its ``p``-th share.
    """
    start, stop = rows
    if data.cached_latents:
        cached = CachedLatentsSource(data.cached_latents)
        if int(cached.metadata["image_size"]) != image_size:
            raise ValueError(f"data.cached_latents {data.cached_latents!r} was encoded at "
                             f"{cached.metadata['image_size']} px; this stage trains at {image_size} px")
        _check_equal_share(rows, global_batch_size, "cached latents")
        keys = [k for k in ("moments", "context", "input_ids") if k in cached.metadata["features"]]
        return make_latents_iterator(cached, global_batch_size=global_batch_size, seed=int(data.seed), keys=keys,
                                     num_threads=int(data.num_threads))
    if data.source in SYNTHETIC:
        return SyntheticCaptions(image_size, global_batch_size, rows, seed=int(data.seed),
                                 num_examples=int(data.num_examples), num_classes=int(data.num_classes),
                                 vocab_size=vocab_size, max_length=text_length,
                                 latents=data.source == "synthetic_latents", latent_channels=latent_channels)
    if captions and tokenizer is None:
        raise ValueError(f"data.source {data.source!r} has text captions: the trainer needs a tokenizer "
                         f"(config.tokenizer) to read them")
    _check_equal_share(rows, global_batch_size, f"data.source {data.source!r}")
    it = make_iterator(make_source(data, image_size, workdir=workdir), global_batch_size=global_batch_size,
                       image_size=image_size, tokenizer=tokenizer if captions else None, seed=int(data.seed),
                       shuffle=True, random_crop=bool(data.random_crop), random_flip=bool(data.random_flip),
                       num_threads=int(data.num_threads), require_caption=captions)
    return NumericBatches(it, ("image", "input_ids") if captions else ("image",))


def _check_equal_share(rows: tuple[int, int], global_batch_size: int, what: str) -> None:
    import jax

    if rows[1] - rows[0] != global_batch_size // jax.process_count():
        raise ValueError(f"rows {rows}: {what} need each process to feed an equal share of the batch")
