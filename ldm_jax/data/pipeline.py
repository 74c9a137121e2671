"""Per-host, deterministic, resumable image-caption batches with grain.

Pipeline (all index-based, so it is a pure function of ``seed`` and the step)::

    source -> shuffle(seed) -> repeat(num_epochs) -> [process_index::process_count]
           -> draw one of the example's ``captions`` + decode + resize + crop + flip + [-1, 1]
              (per-example RNG from (seed, index in the repeated stream, so per epoch))
           -> skip invalid (counted) -> batch(global_batch // process_count) -> tokenize

``make_iterator`` returns a ``DataIterator`` whose ``get_state()``/``set_state()`` (small JSON-able
dicts) resume exactly; save the state in the training checkpoint. Batches are
``{"image": float32 [B,H,W,3] in [-1,1], "caption": str [B], "input_ids": int32 [B,77]
(with a tokenizer), <extra_keys>}``.
"""
from __future__ import annotations

import collections
import logging
from typing import Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from ldm_jax.data import transforms
from ldm_jax.data.buckets import BucketIterator
from ldm_jax.data.transforms import decode_image, per_host_batch_size, preprocess_image

__all__ = [
    "decode_image", "preprocess_image", "per_host_batch_size", "make_dataset", "make_iterator",
    "DataIterator", "DevicePrefetchIterator",
]

_MAX_SKIP_LOGS = 20


class _SkipInvalidIterDataset(grain.IterDataset):
    """Drops ``{transforms.SKIP: reason}`` elements, counting them; the count is part of the iterator state."""

    def __init__(self, parent, max_consecutive: int, description: str):
        super().__init__(parent)
        self.max_consecutive, self.description = max_consecutive, description
        self.last_iterator = None

    def __iter__(self):
        self.last_iterator = _SkipInvalidIterator(self._parent.__iter__(), self.max_consecutive,
                                                  self.description)
        return self.last_iterator


class _SkipInvalidIterator(grain.DatasetIterator):
    def __init__(self, parent, max_consecutive: int, description: str):
        super().__init__(parent)
        self.max_consecutive, self.description = max_consecutive, description
        self.num_skipped, self.num_valid, self._consecutive = 0, 0, 0
        self.reasons: collections.Counter = collections.Counter()

    def __next__(self):
        while True:
            try:
                ex = next(self._parent)
            except StopIteration:
                if self.num_valid == 0:
                    raise ValueError(f"no valid examples in {self.description}: all {self.num_skipped} "
                                     f"skipped ({dict(self.reasons)})") from None
                raise
            if transforms.SKIP not in ex:
                self.num_valid += 1
                self._consecutive = 0
                return ex
            self.num_skipped += 1
            self._consecutive += 1
            reason = ex[transforms.SKIP]
            self.reasons[reason.split(" (")[0]] += 1
            if self.num_skipped <= _MAX_SKIP_LOGS:
                logging.warning("data: skipped example (%s); %d skipped so far", reason, self.num_skipped)
            if self._consecutive >= self.max_consecutive:
                raise ValueError(f"no valid examples in {self.description}: the last {self._consecutive} "
                                 f"examples were all skipped ({dict(self.reasons)})")

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "num_skipped": self.num_skipped,
                "num_valid": self.num_valid}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.num_skipped, self.num_valid = int(state["num_skipped"]), int(state["num_valid"])
        self._consecutive = 0


def _build(source, element_fn: Callable[[dict, np.random.Generator], dict], *, global_batch_size: int,
           seed: int, shuffle: bool, num_epochs: int | None, process_index: int | None,
           process_count: int | None, drop_remainder: bool, num_threads: int,
           batch_fn: Callable[[dict], dict] | None, description: str):
    process_index, process_count = transforms.check_hosts(process_index, process_count)
    batch_size = per_host_batch_size(global_batch_size, process_count)
    n = len(source)
    if n == 0:
        raise ValueError(f"no examples in {description}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if drop_remainder and num_epochs is not None and n >= process_count:
        # every host gets the same number of examples, so hosts stay in lockstep
        ds = ds[: n - n % process_count]
    ds = ds.repeat(num_epochs)
    ds = ds[process_index::process_count]
    ds = ds.random_map(element_fn, seed=seed)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * batch_size, 8))
    skip = _SkipInvalidIterDataset(ds.to_iter_dataset(read), max_consecutive=2 * n + 1,
                                   description=description)
    out = skip.batch(batch_size, drop_remainder=drop_remainder)
    if batch_fn is not None:
        out = out.map(batch_fn)
    return out, skip


def make_dataset(source, *, global_batch_size: int, image_size: int, tokenizer=None, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, random_crop: bool = False,
                 random_flip: bool = False, caption_dropout: float = 0.0, extra_keys: Sequence[str] = (),
                 process_index: int | None = None, process_count: int | None = None,
                 drop_remainder: bool = True, num_threads: int = 4, require_caption: bool = True):
    """This host's grain ``IterDataset`` of batches (see module docstring); returns ``(dataset, skip)``.

    ``source``: any random-access source (``ldm_jax.data.sources``). ``global_batch_size`` is
    split evenly over ``process_count`` hosts (default ``jax.process_count()``).
    ``tokenizer``: ``(list[str]) -> int [B, 77]``. ``num_epochs=None`` repeats forever, with a new
    shuffle each epoch. ``skip.last_iterator.num_skipped`` counts skipped examples. An example with
    several ``captions`` (e.g. :class:`~ldm_jax.data.sources.FolderSource` with ten lines per image)
    uses one drawn per epoch (:class:`~ldm_jax.data.transforms.DrawCaption`).
    ``require_caption=False`` keeps uncaptioned images (autoencoder training).
    """
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
    fn = transforms.DrawCaption(transforms.ImageCaptionTransform(image_size, random_crop, random_flip,
                                                                 caption_dropout, extra_keys, require_caption))
    return _build(source, fn, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                  num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                  drop_remainder=drop_remainder, num_threads=num_threads,
                  batch_fn=None if tokenizer is None else transforms.Tokenize(tokenizer), description=repr(source))


class DataIterator:
    """Checkpointable iterator over batches: ``next(it)``, ``get_state()``, ``set_state(state)``.

    ``num_skipped`` counts the examples skipped so far (corrupt images, empty captions); it is part
    of the state, so it survives a resume.
    """

    def __init__(self, dataset, skip: _SkipInvalidIterDataset):
        self._it = iter(dataset)
        self._skip = skip.last_iterator

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    @property
    def num_skipped(self) -> int:
        return self._skip.num_skipped

    @property
    def skip_reasons(self) -> dict:
        return dict(self._skip.reasons)


def make_iterator(source, *, bucketing: bool = False, **kwargs) -> DataIterator:
    """``DataIterator`` over ``make_dataset(source, **kwargs)``; with ``bucketing=True`` an
    aspect-ratio :class:`ldm_jax.data.buckets.BucketIterator` (same protocol, non-square batches)."""
    if bucketing:
        return BucketIterator(source, **kwargs)
    return DataIterator(*make_dataset(source, **kwargs))


class DevicePrefetchIterator:
    """Keeps ``size`` batches on device ahead of the consumer (``size <= 1``: each batch is read when
    the consumer asks for it); state stays exact.

    Numeric leaves become global ``jax.Array``s with ``sharding`` (built from this host's rows with
    ``jax.make_array_from_process_local_data``); string leaves (captions) stay numpy.
    ``get_state()`` is the state *before* the next batch the consumer will get, so saving it at a
    checkpoint never loses or repeats the prefetched batches.
    """

    def __init__(self, iterator: DataIterator, sharding: jax.sharding.Sharding, size: int = 2):
        self.iterator, self.sharding, self.size = iterator, sharding, size
        self._queue: collections.deque = collections.deque()

    def _put(self, batch: dict) -> dict:
        def put(x):
            x = np.asarray(x)
            if x.dtype.kind in "USO":
                return x
            return jax.make_array_from_process_local_data(self.sharding, x)
        return {k: put(v) for k, v in batch.items()}

    def _fill(self) -> None:
        while len(self._queue) < max(self.size, 1):
            state = self.iterator.get_state()
            try:
                batch = next(self.iterator)
            except StopIteration:
                return
            self._queue.append((state, self._put(batch)))

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        self._fill()
        if not self._queue:
            raise StopIteration
        return self._queue.popleft()[1]

    def get_state(self) -> dict:
        return self._queue[0][0] if self._queue else self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._queue.clear()
        self.iterator.set_state(state)
