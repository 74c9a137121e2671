"""Per-example transforms shared by the data pipelines: decoding, resizing/cropping, captions,
tokenization, and each host's share of a global batch."""
from __future__ import annotations

import io
import math
from typing import Any

import jax
import numpy as np
from PIL import Image

__all__ = ["SKIP", "decode_image", "preprocess_image", "per_host_batch_size", "check_hosts",
           "ImageCaptionTransform", "DrawCaption", "Tokenize"]

SKIP = "_skip"  # key of the marker element standing for an invalid example


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


class ImageCaptionTransform:
    """Raw record -> preprocessed example, or ``{SKIP: reason}`` for corrupt images and (when
    ``require_caption``) empty captions."""

    def __init__(self, image_size, random_crop, random_flip, caption_dropout, extra_keys, require_caption=True):
        self.image_size, self.random_crop, self.random_flip = image_size, random_crop, random_flip
        self.caption_dropout, self.extra_keys = caption_dropout, tuple(extra_keys)
        self.require_caption = require_caption

    def __call__(self, rec: dict, rng: np.random.Generator, size: tuple[int, int] | None = None) -> dict:
        """``size``: (H, W) instead of the square ``image_size`` (aspect-ratio buckets)."""
        size = size or self.image_size
        caption = rec.get("caption", "")
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8", errors="replace")
        caption = str(caption).strip()
        if not caption and self.require_caption:
            return {SKIP: "empty caption"}
        try:
            img = decode_image(rec.get("image"), min_side=int(np.max(size)))
        except Exception as e:  # any decoder failure means a corrupt example, never a crash
            return {SKIP: f"corrupt image ({type(e).__name__}: {e})"}
        flip = bool(self.random_flip and rng.random() < 0.5)
        image = preprocess_image(img, size, self.random_crop, flip, rng)
        if self.caption_dropout and rng.random() < self.caption_dropout:
            caption = ""  # unconditional example for classifier-free guidance
        out = {"image": image, "caption": caption}
        for k in self.extra_keys:
            out[k] = np.asarray(rec[k])
        return out


def check_hosts(process_index, process_count) -> tuple[int, int]:
    """``(process_index, process_count)``, defaulting to JAX's; ValueError when out of range."""
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    return process_index, process_count


class Tokenize:
    """Adds ``input_ids`` (int32 ``[B, L]``) to a batch of ``caption`` strings."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(self.tokenizer([str(c) for c in batch["caption"]]))
        if ids.ndim != 2 or ids.shape[0] != len(batch["caption"]):
            raise ValueError(f"tokenizer must map B strings to int [B, L], got shape {ids.shape}")
        return dict(batch, input_ids=ids.astype(np.int32))


class DrawCaption:
    """Wraps a transform ``(rec, rng, size=None)``: an example with several ``captions`` gets one of
    them as its ``caption``, drawn from the example's own RNG.

    That RNG is a function of the data seed and the example's place in the stream (grain: the index
    in the repeated, shuffled stream, so a new draw each epoch; buckets: the step and row), so the
    draw is deterministic and a resumed iterator sees the captions an uninterrupted one would. It
    is the first draw, so the caption does not depend on which augmentations are on; single-caption
    examples draw nothing and keep their augmentation stream.
    """

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, rec: dict, rng: np.random.Generator, size=None) -> dict:
        captions = rec.get("captions")
        if captions is not None and len(captions) > 1:
            rec = dict(rec, caption=captions[int(rng.integers(len(captions)))])
        return self.transform(rec, rng, size=size)
