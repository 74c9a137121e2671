"""``ldm-jax bench data``: images/s for decode + resize + crop, alone and through the full pipeline."""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from PIL import Image

from typing import Sequence

from ldm_jax.benchmarks.common import parse_overrides
from ldm_jax.data import pipeline, sources

__all__ = ["bench_data", "measure_data"]


def _write_jpegs(folder: str, num_images: int, source_size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = source_size
    # smooth random images (photo-like JPEG sizes), not white noise
    for i in range(num_images):
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        img.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
        with open(os.path.join(folder, f"{i:06d}.txt"), "w") as f:
            f.write(f"a photo number {i}")


def bench_data(config: str | None = None, overrides: Sequence[str] = (), batch: int | None = None,
               steps: int | None = None, peer: bool = True) -> dict:
    """What ``ldm-jax bench data`` prints: :func:`measure_data` with ``batch`` as its batch size and
    ``overrides`` (``--config.image_size=512`` ...) setting its other keyword arguments; ``config``,
    ``steps`` and ``peer`` (no peer here) are not used."""
    opts = parse_overrides(overrides, ("image_size", "num_images", "source_size", "num_threads", "seed", "workdir"))
    if batch is not None:
        opts["batch_size"] = batch
    return dict(measure_data(**opts), bench="data")


def measure_data(image_size: int = 256, num_images: int = 256, source_size: tuple[int, int] = (640, 480),
                 batch_size: int = 32, num_threads: int = 4, seed: int = 0, workdir: str | None = None) -> dict:
    """Time decode+resize+crop on ``num_images`` JPEGs of ``source_size`` (w, h) at ``image_size``.

    Returns JSON-able figures: ``decode_resize_crop_images_per_s`` (one thread, the bare per-image
    work) and ``pipeline_images_per_s`` (grain pipeline with ``num_threads`` threads, random crop
    and flip, batches of ``batch_size``).
    """
    batch_size = min(batch_size, num_images)
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        _write_jpegs(folder, num_images, tuple(source_size), seed)
        src = sources.FolderSource(folder)
        raw = [src[i]["image"] for i in range(len(src))]
        t0 = time.perf_counter()
        for data in raw:
            pipeline.preprocess_image(pipeline.decode_image(data, min_side=image_size), image_size)
        single = len(raw) / (time.perf_counter() - t0)

        it = pipeline.make_iterator(src, global_batch_size=batch_size, image_size=image_size, seed=seed,
                                    num_epochs=1, random_crop=True, random_flip=True, process_index=0,
                                    process_count=1, num_threads=num_threads)
        t0 = time.perf_counter()
        n = sum(b["image"].shape[0] for b in it)
        full = n / (time.perf_counter() - t0)
    return {
        "image_size": image_size, "source_size": list(source_size), "num_images": num_images,
        "decode_resize_crop_images_per_s": round(single, 1),
        "pipeline_images_per_s": round(full, 1), "pipeline_threads": num_threads,
        "batch_size": batch_size, "cpu_count": os.cpu_count(),
    }
