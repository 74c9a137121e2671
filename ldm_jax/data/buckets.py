"""Aspect-ratio bucketing: every global batch comes from one (height, width) bucket.

Buckets (:func:`make_buckets`) have sides that are multiples of ``step`` (64, or 8 below 256 px),
about the pixel count of the ``image_size`` square (``h * w <= S^2``, as close as the step allows)
and an aspect ratio within ``max_aspect_ratio``. Each example goes to the bucket nearest its aspect
ratio (log scale), from its header size (:func:`scan_image_sizes`: one pass, no decoding); an
unreadable image or an empty caption leaves the example out (counted as skipped).

The schedule is a pure function of ``(seed, k)``, the same on every host: epoch ``e = k // B_e``
(``B_e`` batches per epoch, a constant) shuffles the examples with ``(seed, e)``, cuts each
bucket's list into global batches (a bucket's remainder sits this epoch out) and shuffles the
batch order. Host ``p`` loads rows ``[p*b, (p+1)*b)`` of global batch ``k``, resized to cover the
bucket and cropped (the augmentation RNG is seeded with ``(seed, k, row)``, so the rows do not
depend on the number of hosts); an image that fails to decode is replaced by the next valid row of
the same global batch (counted). The state is ``{"step": k, ...}``, so resuming is exact and free.
"""
from __future__ import annotations

import collections
import concurrent.futures
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

from ldm_jax.data import transforms

__all__ = ["make_buckets", "scan_image_sizes", "assign_buckets", "BucketIterator"]


def make_buckets(image_size: int, step: int | None = None, max_aspect_ratio: float = 2.0) -> list[tuple[int, int]]:
    """``(height, width)`` buckets, sorted, with ``h, w`` multiples of ``step`` and ``h * w <= image_size**2``."""
    step = step or (64 if image_size >= 256 else 8)
    if step < 1 or image_size < step or max_aspect_ratio < 1:
        raise ValueError(f"buckets need 1 <= step <= image_size and max_aspect_ratio >= 1; got step={step}, "
                         f"image_size={image_size}, max_aspect_ratio={max_aspect_ratio}")
    area = image_size * image_size
    by_width: dict[int, int] = {}
    for h in range(step, math.floor(image_size * math.sqrt(max_aspect_ratio)) + 1, step):
        w = area // h // step * step
        if w >= step and max(h, w) <= max_aspect_ratio * min(h, w):
            by_width[w] = max(h, by_width.get(w, 0))  # the same width: keep the larger area
    buckets = sorted((h, w) for w, h in by_width.items())
    if not buckets:
        raise ValueError(f"no buckets for image_size={image_size}, step={step}, max_aspect_ratio={max_aspect_ratio}")
    return buckets


def _caption(rec: dict) -> str:
    caption = rec.get("caption", "")
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    return str(caption).strip()


def _header_size(rec: dict) -> tuple[int, int] | str:
    """``(height, width)`` from the image header, or the reason the example is left out."""
    if not _caption(rec):
        return "empty caption"
    data = rec.get("image")
    try:
        if isinstance(data, np.ndarray):
            if data.ndim not in (2, 3) or min(data.shape[:2]) < 1:
                raise ValueError(f"image array of shape {data.shape}")
            return int(data.shape[0]), int(data.shape[1])
        if not data:
            raise ValueError("empty or unreadable file")
        with Image.open(io.BytesIO(bytes(data))) as img:
            w, h = img.size
        if min(w, h) < 1:
            raise ValueError(f"image of size {w}x{h}")
        return h, w
    except Exception:  # noqa: BLE001 (any parser failure means a corrupt example)
        return "corrupt image"


def scan_image_sizes(source, num_threads: int = 8) -> tuple[np.ndarray, collections.Counter]:
    """``(sizes int64 [N, 2] of (height, width), -1 where left out; Counter of reasons left out)``."""
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = list(pool.map(lambda i: _header_size(source[i]), range(len(source))))
    sizes = np.array([r if isinstance(r, tuple) else (-1, -1) for r in results], np.int64).reshape(-1, 2)
    return sizes, collections.Counter(r for r in results if isinstance(r, str))


def assign_buckets(sizes: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Index of the bucket nearest each ``(height, width)`` in log aspect ratio (ties: the first); -1 for -1 rows."""
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    valid = (sizes > 0).all(1)
    ratio = np.log(np.where(valid, sizes[:, 1], 1) / np.where(valid, sizes[:, 0], 1))
    ref = np.log(np.array([w / h for h, w in buckets]))
    return np.where(valid, np.argmin(np.abs(ratio[:, None] - ref[None, :]), axis=1), -1)


class BucketIterator:
    """This host's rows of aspect-ratio-bucketed global batches (see the module docstring).

    Batches are ``{"image": float32 [b,H,W,3] in [-1,1] (H, W of one bucket), "caption": str [b],
    "input_ids" (with a tokenizer), <extra_keys>}``. Takes :func:`ldm_jax.data.make_dataset`'s
    arguments (``drop_remainder`` must be True) plus ``bucket_step``, ``max_aspect_ratio`` and
    ``image_sizes`` (``(sizes, reasons)`` of :func:`scan_image_sizes`, to skip the scan).
    ``get_state()``/``set_state()`` resume exactly; ``buckets``, ``bucket_counts``,
    ``batches_per_epoch`` describe the schedule.
    """

    def __init__(self, source, *, global_batch_size: int, image_size: int, tokenizer=None, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, random_crop: bool = False,
                 random_flip: bool = False, caption_dropout: float = 0.0, extra_keys: Sequence[str] = (),
                 process_index: int | None = None, process_count: int | None = None, drop_remainder: bool = True,
                 num_threads: int = 4, bucket_step: int | None = None, max_aspect_ratio: float = 2.0,
                 image_sizes: tuple[np.ndarray, collections.Counter] | None = None):
        if not drop_remainder:
            raise ValueError("bucketing needs drop_remainder=True (every batch is a full batch of one bucket)")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.process_index, self.process_count = transforms.check_hosts(process_index, process_count)
        self.local_batch = transforms.per_host_batch_size(global_batch_size, self.process_count)
        self.source, self.global_batch, self.seed, self.shuffle = source, global_batch_size, seed, shuffle
        self.num_epochs, self.extra_keys = num_epochs, tuple(extra_keys)
        self.tokenize = None if tokenizer is None else transforms.Tokenize(tokenizer)
        self.transform = transforms.DrawCaption(transforms.ImageCaptionTransform(
            image_size, random_crop, random_flip, caption_dropout, extra_keys))
        self.buckets = make_buckets(image_size, bucket_step, max_aspect_ratio)
        sizes, self.excluded = image_sizes if image_sizes is not None else scan_image_sizes(source, num_threads)
        if len(sizes) != len(source):
            raise ValueError(f"image_sizes has {len(sizes)} rows for {len(source)} examples")
        self.bucket_of = assign_buckets(sizes, self.buckets)
        self.valid = np.flatnonzero(self.bucket_of >= 0)
        self.bucket_counts = np.bincount(self.bucket_of[self.valid], minlength=len(self.buckets))
        self.batches_per_epoch = int(np.sum(self.bucket_counts // global_batch_size))
        if self.batches_per_epoch == 0:
            raise ValueError(f"no bucket of {source!r} holds a full global batch of {global_batch_size} "
                             f"(bucket sizes {dict(zip(self.buckets, self.bucket_counts.tolist()))}, "
                             f"left out {dict(self.excluded)})")
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))
        self._epoch_cache: tuple[int, list] | None = None
        self._prefetched: tuple[int, list] | None = None
        self.step, self._replaced = 0, collections.Counter()

    # -- schedule ---------------------------------------------------------------------------------

    def _epoch(self, e: int) -> list[tuple[int, np.ndarray]]:
        """Global batches ``(bucket, source indices [B])`` of epoch ``e``."""
        if self._epoch_cache is None or self._epoch_cache[0] != e:
            rng = np.random.default_rng([self.seed, e])
            order = rng.permutation(self.valid) if self.shuffle else self.valid
            batches = []
            for b in range(len(self.buckets)):
                members = order[self.bucket_of[order] == b]
                n = len(members) // self.global_batch * self.global_batch
                batches += [(b, members[i:i + self.global_batch]) for i in range(0, n, self.global_batch)]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            self._epoch_cache = (e, batches)
        return self._epoch_cache[1]

    def global_batch_indices(self, k: int) -> tuple[tuple[int, int], np.ndarray]:
        """``((height, width), source indices [global_batch])`` of global batch ``k``."""
        bucket, idx = self._epoch(k // self.batches_per_epoch)[k % self.batches_per_epoch]
        return self.buckets[bucket], idx

    # -- loading ----------------------------------------------------------------------------------

    def _load_row(self, k: int, row: int, size: tuple[int, int], idx: np.ndarray):
        """Example of ``row`` (or the next valid row after it), and the reason ``row`` failed."""
        failed = None
        for t in range(len(idx)):
            r = (row + t) % len(idx)
            ex = self.transform(self.source[int(idx[r])], np.random.default_rng([self.seed, k, row]), size=size)
            if transforms.SKIP not in ex:
                return ex, failed
            failed = failed or ex[transforms.SKIP].split(" (")[0]
        raise ValueError(f"no valid examples in global batch {k} (bucket {size}) of {self.source!r}")

    def _submit(self, k: int) -> list:
        size, idx = self.global_batch_indices(k)
        start = self.process_index * self.local_batch
        return [self._pool.submit(self._load_row, k, r, size, idx) for r in range(start, start + self.local_batch)]

    def _done(self, k: int) -> bool:
        return self.num_epochs is not None and k >= self.num_epochs * self.batches_per_epoch

    def __iter__(self) -> "BucketIterator":
        return self

    def __next__(self) -> dict:
        k = self.step
        if self._done(k):
            raise StopIteration
        if self._prefetched is not None and self._prefetched[0] == k:
            futures = self._prefetched[1]
        else:
            futures = self._submit(k)
        self._prefetched = None if self._done(k + 1) else (k + 1, self._submit(k + 1))
        rows = [f.result() for f in futures]
        for _, failed in rows:
            if failed:
                self._replaced[failed] += 1
        exs = [ex for ex, _ in rows]
        batch = {"image": np.stack([ex["image"] for ex in exs]), "caption": np.array([ex["caption"] for ex in exs])}
        for key in self.extra_keys:
            batch[key] = np.stack([ex[key] for ex in exs])
        self.step = k + 1
        return batch if self.tokenize is None else self.tokenize(batch)

    # -- state ------------------------------------------------------------------------------------

    def get_state(self) -> dict:
        return {"step": self.step, "replaced": dict(self._replaced)}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self._replaced = collections.Counter({k: int(v) for k, v in state.get("replaced", {}).items()})
        self._prefetched = None

    @property
    def num_skipped(self) -> int:
        """Examples left out by the scan plus rows replaced after a decoding failure."""
        return sum(self.excluded.values()) + sum(self._replaced.values())

    @property
    def skip_reasons(self) -> dict:
        return dict(self.excluded + self._replaced)

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
