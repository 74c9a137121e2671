"""Per-host, deterministic, resumable image-caption batches with grain.

Pipeline (all index-based, so it is a pure function of ``seed`` and the step)::

    source -> shuffle(seed) -> repeat(num_epochs) -> [process_index::process_count]
           -> decode + resize + crop + flip + [-1, 1] (per-example RNG from (seed, index))
           -> skip invalid (counted) -> batch(global_batch // process_count) -> tokenize

``make_iterator`` returns a ``DataIterator`` whose ``get_state()``/``set_state()`` (small JSON-able
dicts) resume exactly; save the state in the training checkpoint. Batches are
``{"image": float32 [B,H,W,3] in [-1,1], "caption": str [B], "input_ids": int32 [B,77]
(with a tokenizer), <extra_keys>}``.
"""
from __future__ import annotations

import collections
import io
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np
from PIL import Image

__all__ = [
    "decode_image", "preprocess_image", "per_host_batch_size", "make_dataset", "make_iterator",
    "DataIterator", "DevicePrefetchIterator",
]

_SKIP = "_skip"  # key of the marker element standing for an invalid example
_MAX_SKIP_LOGS = 20


def decode_image(data: Any, min_side: int | None = None) -> Image.Image:
    """Encoded bytes or uint8 [H,W,(1|3|4)] array -> RGB PIL image (raises on corrupt data).

    ``min_side``: JPEGs are decoded at reduced scale (DCT ``draft``) when the shorter side stays
    >= ``min_side``, several times faster for large images.
    """
    if data is None:
        raise ValueError("unreadable file")
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3):
            raise ValueError(f"image array must be uint8 [H,W] or [H,W,C], got {data.dtype} {data.shape}")
        img = Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
    else:
        if len(data) == 0:
            raise ValueError("empty image file")
        img = Image.open(io.BytesIO(bytes(data)))
        if min_side is not None and img.format == "JPEG":
            w, h = img.size
            s = min_side / min(w, h)
            if s < 1:
                img.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
        img.load()  # force full decode here so truncated files fail inside the try
    if img.mode in ("P", "LA") or (img.mode == "RGBA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def preprocess_image(img: Image.Image, image_size: int | tuple[int, int], random_crop: bool = False,
                     flip: bool = False, rng: np.random.Generator | None = None) -> np.ndarray:
    """Resize to cover ``image_size`` (S: the shorter side to S; or (H, W)) with bicubic, crop, flip
    -> float32 [H,W,3] in [-1,1].

    ``random_crop`` uses ``rng`` for the offset (else centre crop); ``flip`` flips left-right.
    """
    th, tw = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else map(int, image_size)
    w, h = img.size
    if min(w, h) < 1:
        raise ValueError(f"image has size {img.size}")
    s = max(th / h, tw / w)
    nw, nh = max(tw, round(w * s)), max(th, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0 if s < 1 / 3 else None)
    if random_crop:
        if rng is None:
            raise ValueError("random_crop needs rng")
        left, top = int(rng.integers(nw - tw + 1)), int(rng.integers(nh - th + 1))
    else:
        left, top = (nw - tw) // 2, (nh - th) // 2
    arr = np.asarray(img, dtype=np.uint8)[top:top + th, left:left + tw]
    if flip:
        arr = arr[:, ::-1]
    return arr.astype(np.float32) * (1.0 / 127.5) - 1.0


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
    """``global_batch_size // process_count``; ValueError unless it divides evenly."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                         f"number of hosts {process_count}")
    return global_batch_size // process_count


class _ImageCaptionTransform:
    """Raw record -> preprocessed example, or ``{_SKIP: reason}`` for corrupt images / empty captions."""

    def __init__(self, image_size, random_crop, random_flip, caption_dropout, extra_keys):
        self.image_size, self.random_crop, self.random_flip = image_size, random_crop, random_flip
        self.caption_dropout, self.extra_keys = caption_dropout, tuple(extra_keys)

    def __call__(self, rec: dict, rng: np.random.Generator, size: tuple[int, int] | None = None) -> dict:
        """``size``: (H, W) instead of the square ``image_size`` (aspect-ratio buckets)."""
        size = size or self.image_size
        caption = rec.get("caption", "")
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8", errors="replace")
        caption = str(caption).strip()
        if not caption:
            return {_SKIP: "empty caption"}
        try:
            img = decode_image(rec.get("image"), min_side=int(np.max(size)))
        except Exception as e:  # any decoder failure means a corrupt example, never a crash
            return {_SKIP: f"corrupt image ({type(e).__name__}: {e})"}
        flip = bool(self.random_flip and rng.random() < 0.5)
        image = preprocess_image(img, size, self.random_crop, flip, rng)
        if self.caption_dropout and rng.random() < self.caption_dropout:
            caption = ""  # unconditional example for classifier-free guidance
        out = {"image": image, "caption": caption}
        for k in self.extra_keys:
            out[k] = np.asarray(rec[k])
        return out


class _SkipInvalidIterDataset(grain.IterDataset):
    """Drops ``{_SKIP: reason}`` elements, counting them; the count is part of the iterator state."""

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
            if _SKIP not in ex:
                self.num_valid += 1
                self._consecutive = 0
                return ex
            self.num_skipped += 1
            self._consecutive += 1
            reason = ex[_SKIP]
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


def _check_hosts(process_index, process_count):
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    return process_index, process_count


def _build(source, element_fn: Callable[[dict, np.random.Generator], dict], *, global_batch_size: int,
           seed: int, shuffle: bool, num_epochs: int | None, process_index: int | None,
           process_count: int | None, drop_remainder: bool, num_threads: int,
           batch_fn: Callable[[dict], dict] | None, description: str):
    process_index, process_count = _check_hosts(process_index, process_count)
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


class _Tokenize:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(self.tokenizer([str(c) for c in batch["caption"]]))
        if ids.ndim != 2 or ids.shape[0] != len(batch["caption"]):
            raise ValueError(f"tokenizer must map B strings to int [B, L], got shape {ids.shape}")
        return dict(batch, input_ids=ids.astype(np.int32))


def make_dataset(source, *, global_batch_size: int, image_size: int, tokenizer=None, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, random_crop: bool = False,
                 random_flip: bool = False, caption_dropout: float = 0.0, extra_keys: Sequence[str] = (),
                 process_index: int | None = None, process_count: int | None = None,
                 drop_remainder: bool = True, num_threads: int = 4):
    """This host's grain ``IterDataset`` of batches (see module docstring); returns ``(dataset, skip)``.

    ``source``: any random-access source (``ldm_jax.data.sources``). ``global_batch_size`` is
    split evenly over ``process_count`` hosts (default ``jax.process_count()``).
    ``tokenizer``: ``(list[str]) -> int [B, 77]``. ``num_epochs=None`` repeats forever, with a new
    shuffle each epoch. ``skip.last_iterator.num_skipped`` counts skipped examples.
    """
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
    fn = _ImageCaptionTransform(image_size, random_crop, random_flip, caption_dropout, extra_keys)
    return _build(source, fn, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                  num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                  drop_remainder=drop_remainder, num_threads=num_threads,
                  batch_fn=None if tokenizer is None else _Tokenize(tokenizer), description=repr(source))


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
        from ldm_jax.data.buckets import BucketIterator

        return BucketIterator(source, **kwargs)
    return DataIterator(*make_dataset(source, **kwargs))


class DevicePrefetchIterator:
    """Keeps ``size`` batches on device ahead of the consumer; state stays exact.

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
        while len(self._queue) < self.size:
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
