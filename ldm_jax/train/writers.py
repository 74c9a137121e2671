"""Metric writers: TensorBoard scalars/images (process 0 only) and a tqdm progress bar."""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import numpy as np

__all__ = ["MetricWriter", "image_grid"]


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
    """Writes to ``logdir`` with tensorboardX on process 0 (no-op elsewhere or when unavailable)."""

    def __init__(self, logdir: str | None):
        self._tb = None
        if logdir and jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                logging.warning("tensorboardX not installed: no TensorBoard logs")
            else:
                os.makedirs(logdir, exist_ok=True)
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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
