"""The synthetic data set (``data.source="synthetic"``/``"synthetic_latents"``): deterministic,
in memory, for tests, benchmarks and CPU experiments of both trainers.

Same batch structure as the real pipelines (``{"image": [B,H,W,3] in [-1,1], "input_ids": int32
[B,77]}``, or ``{"latents": [B,h,w,C], "input_ids"}`` for precomputed latents) and the same
``get_state``/``set_state`` protocol. Each example belongs to one of ``num_classes`` classes; its
caption is ``[BOS, word_c, EOS, pad...]`` and its picture a class-specific colour/stripe pattern
(latents: a class-specific smooth pattern), so a conditioned model has something to learn.
Batch ``p`` is a pure function of ``(seed, p)``: any process can produce any rows of it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SyntheticCaptions", "epoch_order"]


def epoch_order(n: int, start: int, count: int, seed: tuple) -> np.ndarray:
    """Items ``start .. start + count`` of an endless walk over ``n`` examples, each epoch ``e`` in its own
    permutation (``default_rng((*seed, e))``): a pure function of the position, so a resumed run goes on
    from its saved position with the same order."""
    first, last = start // n, (start + count - 1) // n
    order = np.concatenate([np.random.default_rng((*seed, e)).permutation(n) for e in range(first, last + 1)])
    return order[start - first * n:start - first * n + count]


class SyntheticCaptions:
    """Iterator over global batch rows ``[rows[0], rows[1])`` (host-local part of each batch).

    Args:
      resolution: image side in pixels (``latents=False``) or latent side (``latents=True``).
      global_batch: examples per global batch.
      rows: this process's ``[start, stop)`` rows of every global batch (default: all).
      seed, num_examples, num_classes: the fixed data set and its shuffling.
      vocab_size: token ids used are ``< vocab_size``; BOS/EOS/pad are ``vocab_size-2``, ``-1``, ``-1``.
      latents, latent_channels: yield ``latents`` instead of ``image``.
    """

    def __init__(self, resolution: int, global_batch: int, rows: tuple[int, int] | None = None, *,
                 seed: int = 0, num_examples: int = 256, num_classes: int = 8, vocab_size: int = 1000,
                 max_length: int = 77, latents: bool = False, latent_channels: int = 4):
        if num_classes > vocab_size - 3:
            raise ValueError(f"num_classes {num_classes} needs a vocab_size > {num_classes + 3}")
        self.global_batch = global_batch
        self.rows = rows or (0, global_batch)
        self.seed = seed
        self.position = 0
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, num_classes, num_examples)
        bos, eos = vocab_size - 2, vocab_size - 1
        ids = np.full((num_examples, max_length), eos, np.int32)
        ids[:, 0] = bos
        ids[:, 1] = 1 + self.labels * ((vocab_size - 3) // num_classes)
        self.input_ids = ids
        yy, xx = np.meshgrid(np.linspace(-1, 1, resolution), np.linspace(-1, 1, resolution), indexing="ij")
        c = self.labels[:, None, None].astype(np.float32)
        jitter = rng.uniform(-0.3, 0.3, (num_examples, 1, 1)).astype(np.float32)
        if latents:
            chans = [np.sin((1 + c) * xx + k * yy + jitter) * np.cos(k * xx - c * yy) for k in range(latent_channels)]
            self.data = np.stack(chans, -1).astype(np.float32)
            self.key = "latents"
        else:
            hue = np.stack([np.cos(c + k * 2.1) for k in range(3)], -1) * 0.6
            stripes = np.sin((2 + c) * np.pi * (xx * np.cos(c) + yy * np.sin(c)) + jitter)[..., None]
            self.data = np.clip(hue + 0.4 * stripes, -1, 1).astype(np.float32)
            self.key = "image"

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = epoch_order(len(self.labels), self.position * self.global_batch, self.global_batch, (self.seed,))
        idx = idx[self.rows[0]:self.rows[1]]
        self.position += 1
        return {self.key: self.data[idx], "input_ids": self.input_ids[idx]}

    def get_state(self) -> dict[str, Any]:
        return {"position": self.position}

    def set_state(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
