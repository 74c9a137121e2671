"""The Stable Diffusion evaluation protocol: FID and CLIP score over a sweep of guidance scales.

For each classifier-free guidance scale (SD paper: 1.5, 2, 3, ..., 8), generate one image per
caption, then FID between their features and the real images' features, and the CLIP score of
each image against its caption. The FID-vs-CLIP curve, one point per scale, shows the trade-off
between sample quality/diversity (FID, lower is better) and text alignment (CLIP, higher).

Every scale uses the same initial noise (batch k is seeded ``seed + k``), so the scales differ
only in guidance. ``metrics.json`` is rewritten after each scale, so a long run leaves partial
results behind.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ldm_jax import storage

__all__ = [
    "DEFAULT_GUIDANCE_SCALES",
    "IMAGE_EXTENSIONS",
    "read_captions",
    "ImageFolder",
    "load_image_folder",
    "generate_images",
    "inception_feature_fn",
    "plot_fid_vs_clip",
    "evaluate_guidance_sweep",
    "run_eval",
]

DEFAULT_GUIDANCE_SCALES = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_CAPTION_KEYS = ("caption", "text", "prompt")
METRICS_FILE = "metrics.json"
PLOT_FILE = "fid_vs_clip.png"


def read_captions(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """``.txt`` (one caption per non-empty line) or ``.jsonl`` (per line: a JSON string or an object
    with ``caption``/``text``/``prompt``) -> the first ``limit`` captions."""
    path = os.fspath(path)
    captions: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.lower().endswith(".jsonl"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from e
                if isinstance(item, dict):
                    item = next((item[k] for k in _CAPTION_KEYS if k in item), None)
                if not isinstance(item, str):
                    raise ValueError(f"{path}:{lineno}: expected a string or an object with one of "
                                     f"{_CAPTION_KEYS} holding a string")
                line = item
            captions.append(line)
            if limit is not None and len(captions) >= limit:
                break
    if not captions:
        raise ValueError(f"{path} holds no captions")
    return captions


class ImageFolder(Sequence):
    """The images of a folder (sorted; subfolders not read) as a lazy sequence: ``folder[i:j]`` reads
    those files -> uint8 ``[j - i, size, size, 3]``, each resized (shorter side, PIL bicubic) and
    center-cropped to ``size``. Nothing is held in memory between reads."""

    def __init__(self, path: str | os.PathLike, size: int, limit: int | None = None):
        self.path, self.size = os.fspath(path), int(size)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"real image folder {self.path} does not exist")
        self.names = sorted(n for n in os.listdir(self.path) if n.lower().endswith(IMAGE_EXTENSIONS))[:limit]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        from PIL import Image

        from ldm_jax.eval.clip_score import resize_center_crop

        names = self.names[index] if isinstance(index, slice) else [self.names[index]]
        out = np.empty((len(names), self.size, self.size, 3), np.uint8)
        for i, name in enumerate(names):
            with Image.open(os.path.join(self.path, name)) as im:
                out[i] = resize_center_crop(np.asarray(im.convert("RGB")), self.size)
        return out if isinstance(index, slice) else out[0]


def load_image_folder(path: str | os.PathLike, size: int, limit: int | None = None) -> ImageFolder:
    """:class:`ImageFolder` of at least 2 images (FID's minimum); ``np.asarray`` it for an array."""
    folder = ImageFolder(path, size, limit)
    if len(folder) < 2:
        raise ValueError(f"{folder.path} holds {len(folder)} image(s) ({'/'.join(IMAGE_EXTENSIONS)}); "
                         "FID needs >= 2")
    return folder


def _generated_batches(pipe, captions: list[str], guidance_scale: float, *, num_inference_steps: int,
                       sampler: str, seed: int, batch_size: int, height: int | None, width: int | None):
    """Yield ``(start, uint8 [count, H, W, 3])`` per batch of ``captions``. Batch k is seeded
    ``seed + k``; the last batch is padded with repeats of its last caption so every call has the
    same shape (one compile), and the padding is dropped."""
    from tqdm.auto import tqdm

    bs = max(1, min(int(batch_size), len(captions)))
    for k, start in enumerate(tqdm(range(0, len(captions), bs), desc=f"generate w={guidance_scale:g}",
                                   unit="batch", disable=len(captions) <= bs)):
        batch = captions[start:start + bs]
        count = len(batch)
        batch = batch + [batch[-1]] * (bs - count)
        images = pipe(batch, num_inference_steps=num_inference_steps, guidance_scale=float(guidance_scale),
                      sampler=sampler, seed=seed + k, height=height, width=width, output_type="np")
        yield start, (np.asarray(images[:count]) * 255).round().astype(np.uint8)  # rounded as to_pil


def generate_images(pipe, captions: Sequence[str], guidance_scale: float, *, num_inference_steps: int = 50,
                    sampler: str = "pndm", seed: int = 0, batch_size: int = 8, height: int | None = None,
                    width: int | None = None) -> np.ndarray:
    """One image per caption -> uint8 ``[N, H, W, 3]``, generated in batches as in the sweep
    (batch k seeded ``seed + k``, so an image depends on its batch, not on the captions after it)."""
    return np.concatenate([images for _, images in _generated_batches(
        pipe, list(captions), guidance_scale, num_inference_steps=num_inference_steps, sampler=sampler,
        seed=seed, batch_size=batch_size, height=height, width=width)])


def inception_feature_fn(path: str | None = None, batch_size: int = 50) -> Callable[[np.ndarray], np.ndarray]:
    """pytorch-fid's InceptionV3 pool3 features as ``feature_fn``: uint8 ``[N, H, W, 3]`` -> ``[N, 2048]``.

    Loads the weights now (``path``: see :func:`ldm_jax.eval.inception.load_inception`), so a
    missing file fails before any image is generated.
    """
    from ldm_jax.eval.inception import inception_features, load_inception

    model, params = load_inception(path)

    def inception_pool3(images):
        return inception_features(model, params, images, batch_size=batch_size)

    return inception_pool3


def plot_fid_vs_clip(results: Sequence[dict], path: str, title: str | None = None) -> str:
    """PNG of FID (y) against CLIP score (x), one labelled point per guidance scale; against the
    guidance scale when there is no CLIP score. Uses the Agg canvas, never pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    have_clip = all(r.get("clip_score") is not None for r in results)
    xs = [r["clip_score"] if have_clip else r["guidance_scale"] for r in results]
    ys = [r["fid"] for r in results]
    fig = Figure(figsize=(5.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys, "o-", color="tab:blue")
    for x, y, r in zip(xs, ys, results):
        ax.annotate(f"w={r['guidance_scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("CLIP score" if have_clip else "guidance scale")
    ax.set_ylabel("FID")
    ax.set_title(title or ("FID vs CLIP score over guidance scales" if have_clip else "FID over guidance scales"))
    ax.margins(0.1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(path, buf.getvalue())  # local or cloud, atomic
    return path


def _write_json(obj: dict, path: str) -> None:
    storage.write_json(path, obj)


def evaluate_guidance_sweep(pipe, captions: Sequence[str], real_images: np.ndarray,
                            guidance_scales: Sequence[float] = DEFAULT_GUIDANCE_SCALES, *,
                            num_inference_steps: int = 50, sampler: str = "pndm", seed: int = 0,
                            feature_fn: Callable[[np.ndarray], np.ndarray], clip: Any = None,
                            out_dir: str | os.PathLike, batch_size: int = 8, height: int | None = None,
                            width: int | None = None, save_images: bool = False, chunk_size: int = 256) -> dict:
    """FID and CLIP score of ``pipe`` at each guidance scale; writes ``metrics.json`` and ``fid_vs_clip.png``.

    Args:
      pipe: a :class:`ldm_jax.pipeline.StableDiffusionPipeline`.
      captions: N prompts, one image each per scale (N >= 2 for FID).
      real_images: uint8 ``[M, H, W, 3]`` reference images (M >= 2; an array, memmap or
        :class:`ImageFolder`), passed to ``feature_fn`` once, ``chunk_size`` at a time.
      feature_fn: uint8 ``[N, H, W, 3]`` -> ``[N, D]`` features, e.g. :func:`inception_feature_fn`.
      clip: ``None`` (no CLIP score), a :class:`ldm_jax.eval.clip_score.LoadedCLIP`, or a path/hub
        id for :func:`ldm_jax.eval.clip_score.load_clip`. Without a tokenizer of its own, the
        pipeline's (SD v1's is CLIP ViT-L/14's) is used.
      batch_size: images per pipeline call (the last batch is padded: one compile).
      height, width: generated size (default: the model's).
      save_images: also write the samples as ``out_dir/samples/w<scale>/<index>.png``.
      chunk_size: generated images held at a time; ``feature_fn`` and the CLIP model see chunks
        of this size (the last one smaller), so memory stays bounded for 10k-30k captions.
    Returns:
      The metrics dict written to ``metrics.json``: ``results`` (one ``{"guidance_scale", "fid",
      "clip_score"}`` per scale, ``clip_score`` None without ``clip``) and the settings.
    """
    from ldm_jax.eval.fid import fid_from_features

    captions = list(captions)
    if len(captions) < 2:
        raise ValueError(f"FID needs >= 2 generated images; got {len(captions)} caption(s)")
    if not guidance_scales:
        raise ValueError("no guidance scales given")
    out_dir = os.fspath(out_dir)
    storage.makedirs(out_dir)
    if isinstance(clip, (str, os.PathLike)):
        from ldm_jax.eval.clip_score import load_clip

        clip = load_clip(clip)
    real_feats = np.concatenate([_features(feature_fn, real_images[i:i + chunk_size])
                                 for i in range(0, len(real_images), chunk_size)])
    metrics = {
        "results": [],
        "guidance_scales": [float(g) for g in guidance_scales],
        "num_generated": len(captions),
        "num_real": int(len(real_images)),
        "num_inference_steps": int(num_inference_steps),
        "sampler": sampler,
        "seed": int(seed),
        "feature_fn": getattr(feature_fn, "__name__", type(feature_fn).__name__),
        "feature_dim": int(real_feats.shape[1]),
        "clip_model": None if clip is None else str(clip.source),
        "plot": PLOT_FILE,
    }
    for g in guidance_scales:
        feats, scores = _measure_scale(pipe, captions, g, feature_fn, clip, num_inference_steps=num_inference_steps,
                                       sampler=sampler, seed=seed, batch_size=batch_size, height=height, width=width,
                                       chunk_size=chunk_size,
                                       save_dir=storage.join(out_dir, "samples", f"w{g:g}") if save_images else None)
        score = None if scores is None else float(np.mean(scores))
        metrics["results"].append({"guidance_scale": float(g), "fid": fid_from_features(feats, real_feats),
                                   "clip_score": score})
        _write_json(metrics, storage.join(out_dir, METRICS_FILE))
    plot_fid_vs_clip(metrics["results"], storage.join(out_dir, PLOT_FILE))
    return metrics


def _features(feature_fn, images) -> np.ndarray:
    feats = np.asarray(feature_fn(images))
    if feats.ndim != 2 or len(feats) != len(images):
        raise ValueError(f"feature_fn returned shape {feats.shape} for {len(images)} images; expected [N, D]")
    return feats


def _measure_scale(pipe, captions, guidance_scale, feature_fn, clip, *, num_inference_steps, sampler, seed,
                   batch_size, height, width, chunk_size, save_dir):
    """Generate at one guidance scale -> (features [N, D], per-image CLIP scores [N] or None).

    Images are measured ``chunk_size`` at a time and then dropped, so memory does not grow with N.
    """
    from PIL import Image

    from ldm_jax.eval.clip_score import clip_scores

    feats, scores, pending, done = [], [], [], 0

    def flush():
        nonlocal pending, done
        if not pending:
            return
        images = np.concatenate(pending)
        caps = captions[done:done + len(images)]
        feats.append(_features(feature_fn, images))
        if clip is not None:
            tokenizer = clip.tokenizer if clip.tokenizer is not None else pipe.tokenizer
            scores.append(clip_scores(clip.model, clip.params, tokenizer, images, caps))
        pending, done = [], done + len(images)

    for start, images in _generated_batches(pipe, captions, guidance_scale, num_inference_steps=num_inference_steps,
                                            sampler=sampler, seed=seed, batch_size=batch_size, height=height,
                                            width=width):
        if save_dir is not None:
            storage.makedirs(save_dir)
            for i, im in enumerate(images, start):
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="PNG")
                storage.write_bytes(storage.join(save_dir, f"{i:05d}.png"), buf.getvalue())
        pending.append(images)
        if sum(map(len, pending)) >= chunk_size:
            flush()
    flush()
    return np.concatenate(feats), (np.concatenate(scores) if clip is not None else None)


def run_eval(model: str, captions: str, real_images: str, out_dir: str, *,
             guidance_scales: Sequence[float] = DEFAULT_GUIDANCE_SCALES, num_inference_steps: int = 50,
             sampler: str = "pndm", num: int | None = None, inception: str | None = None,
             clip: str | None = "openai/clip-vit-large-patch14", seed: int = 0, batch_size: int = 8,
             save_images: bool = False) -> dict:
    """What ``ldm-jax eval`` does: read captions and real images, load the model, Inception and CLIP
    (each failing before any generation), run :func:`evaluate_guidance_sweep` at the model's default size.

    ``clip``: path or hub id; ``None``/``""``/``"none"`` skips the CLIP score.
    """
    from ldm_jax.pipeline import StableDiffusionPipeline

    caps = read_captions(captions, limit=num)
    if not os.path.isdir(real_images):
        raise FileNotFoundError(f"real image folder {real_images} does not exist")
    feature_fn = inception_feature_fn(inception)
    loaded_clip = None
    if clip and str(clip).lower() != "none":
        from ldm_jax.eval.clip_score import load_clip

        loaded_clip = load_clip(clip)
    pipe = StableDiffusionPipeline.from_pretrained(model)
    size = int(pipe.config.unet["sample_size"]) * pipe.vae_scale
    real = load_image_folder(real_images, size)
    metrics = evaluate_guidance_sweep(pipe, caps, real, guidance_scales, num_inference_steps=num_inference_steps,
                                      sampler=sampler, seed=seed, feature_fn=feature_fn, clip=loaded_clip,
                                      out_dir=out_dir, batch_size=batch_size, save_images=save_images)
    metrics["model"] = model
    _write_json(metrics, storage.join(out_dir, METRICS_FILE))
    return metrics
