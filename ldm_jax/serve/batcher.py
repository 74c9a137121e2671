"""Dynamic batching of image requests onto the pipeline's jitted loop.

Requests are split into image rows; rows that can share one call (same mode, size, steps, sampler,
guided or not, img2img strength) wait together for at most ``max_wait_s`` and run as one batch,
padded to the smallest of ``buckets`` that holds them, so that after warm-up no batch size is new
to the compiler. Every row carries its own prompt, negative prompt, seed and guidance scale (the
pipeline's per-image seeds and scales): a row's image depends on that row alone, never on the
rows it was batched with (bit-identical within one bucket size).

The queue is bounded (:class:`QueueFull` past ``max_queue`` rows); a batch that fails is retried
request by request, so one bad request never fails the others; the worker thread never dies on a
request's error.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np

__all__ = ["BatchKey", "Row", "Batcher", "QueueFull", "DEFAULT_BUCKETS"]

DEFAULT_BUCKETS = (1, 2, 4, 8)


class QueueFull(RuntimeError):
    """The batcher holds ``max_queue`` rows already: try again later."""


@dataclasses.dataclass(frozen=True)
class BatchKey:
    """What rows must share to run in one call (each distinct value is its own compiled loop)."""

    mode: str  # "txt2img" | "img2img" | "inpaint"
    height: int
    width: int
    steps: int
    sampler: str
    guided: bool  # any guidance scale > 1 runs the (unconditional, conditional) pairs
    sampler_options: tuple = ()  # sorted (name, value) pairs, e.g. (("use_karras_sigmas", True),)
    strength: float = 1.0  # img2img: the start step (one per call)


@dataclasses.dataclass
class Row:
    """One image to make."""

    prompt: str
    negative_prompt: str
    seed: int
    guidance_scale: float
    init_image: np.ndarray | None = None  # img2img, inpaint: float32 [H, W, 3] in [0, 1]
    mask: np.ndarray | None = None  # inpaint: float32 [H, W, 3], white = repaint


@dataclasses.dataclass
class _Job:
    key: BatchKey
    rows: list[Row]
    future: concurrent.futures.Future
    images: list = dataclasses.field(default_factory=list)
    pending: collections.deque = dataclasses.field(default_factory=collections.deque)  # row indices not yet run
    done: int = 0
    submitted: float = dataclasses.field(default_factory=time.monotonic)

    def __post_init__(self):
        self.images = [None] * len(self.rows)
        self.pending.extend(range(len(self.rows)))


class Batcher:
    """Runs image rows in batches on a worker thread.

    Args:
      run: ``run(key, rows) -> float [len(rows), H, W, 3]`` images in [0, 1] (the pipeline call).
      buckets: the batch sizes a call is padded to (sorted; the largest is the most rows per call).
      max_wait_s: how long the first row of a batch waits for others.
      max_queue: the most rows waiting; :meth:`submit` raises :class:`QueueFull` past it.
      on_batch: ``on_batch(key, real_rows, bucket, seconds)`` after every call (metrics).
    """

    def __init__(self, run: Callable[[BatchKey, Sequence[Row]], np.ndarray], *,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, max_wait_s: float = 0.02, max_queue: int = 64,
                 on_batch: Callable[[BatchKey, int, int, float], None] | None = None):
        buckets = sorted({int(b) for b in buckets})
        if not buckets or buckets[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {buckets}")
        if max_wait_s < 0 or max_queue < 1:
            raise ValueError(f"max_wait_s must be >= 0 and max_queue >= 1, got {max_wait_s}, {max_queue}")
        self.run_fn, self.buckets = run, tuple(buckets)
        self.max_wait_s, self.max_queue = float(max_wait_s), int(max_queue)
        self.on_batch = on_batch
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="ldm-jax-batcher", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Rows waiting to run."""
        return self._queued_rows

    def bucket_for(self, rows: int) -> int:
        """The batch size ``rows`` rows are padded to."""
        return next(b for b in self.buckets if b >= rows)

    def submit(self, key: BatchKey, rows: Sequence[Row]) -> concurrent.futures.Future:
        """Queue ``rows``; the future gives their images (float ``[n, H, W, 3]``) in order."""
        if not rows:
            raise ValueError("a request needs at least one image")
        job = _Job(key, list(rows), concurrent.futures.Future())
        with self._cond:
            if self._stop:
                raise RuntimeError("the batcher is stopped")
            if self._queued_rows + len(rows) > self.max_queue:
                raise QueueFull(f"{self._queued_rows} images queued (at most {self.max_queue})")
            self._jobs.append(job)
            self._queued_rows += len(rows)
            self._cond.notify()
        return job.future

    def cancel(self, future: concurrent.futures.Future) -> None:
        """Drop the rows of ``future``'s request that have not run (e.g. its client gave up)."""
        with self._cond:
            for job in list(self._jobs):
                if job.future is future:
                    self._queued_rows -= len(job.pending)
                    job.pending.clear()
                    self._jobs.remove(job)
        future.cancel()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker after the batch in flight; queued requests fail."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        for job in list(self._jobs):
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    # -- the worker -------------------------------------------------------------------------

    def _take(self) -> tuple[BatchKey, list[tuple[_Job, int]]] | None:
        """Wait for rows, then for a full bucket or the oldest row's ``max_wait_s``; take one batch."""
        largest = self.buckets[-1]
        with self._cond:
            while not self._jobs and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            first = self._jobs[0]
            key, deadline = first.key, first.submitted + self.max_wait_s
            while not self._stop:
                ready = sum(len(j.pending) for j in self._jobs if j.key == key)
                left = deadline - time.monotonic()
                if ready >= largest or left <= 0:
                    break
                self._cond.wait(left)
            taken: list[tuple[_Job, int]] = []
            for job in list(self._jobs):
                if job.key != key:
                    continue
                while job.pending and len(taken) < largest:
                    taken.append((job, job.pending.popleft()))
                if not job.pending:
                    self._jobs.remove(job)
                if len(taken) == largest:
                    break
            self._queued_rows -= len(taken)
            return key, taken

    def _loop(self) -> None:
        while True:
            got = self._take()
            if got is None:
                return
            key, taken = got
            try:
                self._run_batch(key, taken)
            except BaseException as e:  # noqa: BLE001 - the worker outlives any request
                logging.exception("batch failed unexpectedly")
                for job, _ in taken:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _run_batch(self, key: BatchKey, taken: list[tuple[_Job, int]]) -> None:
        live = [(job, i) for job, i in taken if not job.future.done()]  # cancelled or failed meanwhile
        if not live:
            return
        rows = [job.rows[i] for job, i in live]
        bucket = self.bucket_for(len(rows))
        padded = rows + [rows[-1]] * (bucket - len(rows))  # pad rows' images are dropped
        t = time.monotonic()
        try:
            images = np.asarray(self.run_fn(key, padded))
        except Exception as e:  # noqa: BLE001
            if len({id(job) for job, _ in live}) == 1:
                for job, _ in live:
                    if not job.future.done():
                        job.future.set_exception(e)
                return
            # several requests: run each alone, so that only the one at fault fails
            by_job: dict[int, list[tuple[_Job, int]]] = {}
            for job, i in live:
                by_job.setdefault(id(job), []).append((job, i))
            for group in by_job.values():
                self._run_batch(key, group)
            return
        if self.on_batch is not None:
            self.on_batch(key, len(rows), bucket, time.monotonic() - t)
        for (job, i), image in zip(live, images):
            job.images[i] = image
            job.done += 1
            if job.done == len(job.rows) and not job.future.done():
                job.future.set_result(np.stack(job.images))
