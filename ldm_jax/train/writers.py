"""Metric writers: TensorBoard scalars/images (process 0 only; local or cloud logdirs) and the
trainers' metrics log."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

__all__ = ["MetricWriter", "MetricsLog", "image_grid"]


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """``[N, H, W, C]`` in [-1, 1] -> one ``[rows*H, cols*W, C]`` uint8 grid."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"expected [N, H, W, C] images, got shape {images.shape}")
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    u8 = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = u8[i]
    return grid


class MetricWriter:
    """Writes to ``logdir`` with tensorboardX on process 0 (no-op elsewhere or when unavailable).

    A cloud ``logdir`` (``gs://...``): the event files are written to a local directory and copied
    into the bucket by :meth:`flush` (at most once every ``upload_every_s`` seconds: each copy
    uploads a whole, growing event file from the training thread) and by :meth:`close`; an event file
    is an object uploaded whole, so readers always see complete records.
    """

    def __init__(self, logdir: str | None, upload_every_s: float = 60.0):
        self._tb, self._remote, self._local = None, None, None
        self._upload_every_s, self._uploaded_at = float(upload_every_s), time.monotonic()
        if logdir and jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                logging.warning("tensorboardX not installed: no TensorBoard logs")
            else:
                from ldm_jax import storage

                if storage.is_remote(logdir):
                    self._remote, self._local = logdir, tempfile.mkdtemp(prefix="ldm_jax_tb_")
                    logdir = self._local
                storage.makedirs(logdir)
                self._tb = SummaryWriter(logdir)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), int(step))

    def image(self, step: int, tag: str, grid: np.ndarray) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, grid, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            if time.monotonic() - self._uploaded_at >= self._upload_every_s:
                self._upload()

    def _upload(self) -> None:
        if self._remote is None:
            return
        from ldm_jax import storage

        for name in os.listdir(self._local):
            storage.copy_file(os.path.join(self._local, name), storage.join(self._remote, name))
        self._uploaded_at = time.monotonic()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._upload()
            self._tb = None
            if self._local is not None:
                shutil.rmtree(self._local, ignore_errors=True)


class MetricsLog:
    """The trainers' metrics: per-step device metrics queued without blocking, fetched once per
    logging window.

    ``add(step, metrics, num_images)`` after each step; ``flush()`` every ``log_every`` steps fetches
    the queued steps in one ``jax.device_get`` and returns the window's last step's metrics (python
    floats, with ``step``) plus ``images_per_s``: the window's images over the time from the
    previous flush (or construction) to the end of this fetch. The fetch waits for the queued steps
    to run, so timing before it would count only their dispatch. ``close()`` fetches what is left
    and returns the history: one dict per step (``step`` and the step's metrics).

    Args:
      rate_in_history: also store ``images_per_s`` in the history entry of each window's last step.
      clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, *, rate_in_history: bool = False, clock: Callable[[], float] = time.perf_counter):
        self._rate_in_history = rate_in_history
        self._clock = clock
        self._pending: list[tuple[int, Any]] = []
        self._unflushed = 0  # steps fetched since the last flush
        self._images = 0
        self._start = clock()
        self.history: list[dict] = []

    def add(self, step: int, metrics: Mapping[str, Any], num_images: int) -> None:
        """Queue the (device) ``metrics`` of ``step``, which consumed ``num_images`` images."""
        self._pending.append((int(step), metrics))
        self._images += int(num_images)

    def _fetch(self) -> list[dict]:
        pending, self._pending = self._pending, []
        fetched = jax.device_get([m for _, m in pending])
        rows = [dict({k: float(v) for k, v in m.items()}, step=s) for (s, _), m in zip(pending, fetched)]
        self.history.extend(rows)
        return rows

    def fetch(self) -> list[dict]:
        """Fetch the queued steps into the history now (e.g. to check them before a checkpoint) without
        ending the logging window; returns their rows."""
        rows = self._fetch() if self._pending else []
        self._unflushed += len(rows)
        return rows

    def flush(self) -> dict:
        """Fetch the queued steps; the window's last step's metrics with ``step`` and ``images_per_s``
        (``{}`` when no step ran since the last flush). Starts the next window."""
        self.fetch()  # blocks until the queued steps ran: read the clock after it
        if not self._unflushed:
            return {}
        self._unflushed = 0
        now = self._clock()
        out = dict(self.history[-1])
        out["images_per_s"] = self._images / max(now - self._start, 1e-9)
        if self._rate_in_history:
            self.history[-1]["images_per_s"] = out["images_per_s"]
        self._start, self._images = now, 0
        return out

    def close(self) -> list[dict]:
        """Fetch the steps still queued (no ``images_per_s`` for them) and return the history."""
        if self._pending:
            self._fetch()
        return self.history
