"""Attribute classifier for ``shapes_captions``: reads what a generated image shows.

A small CNN trained on real single-shape scenes (``make_example(..., max_shapes=1)``) with one
head per attribute of the shape (``shape`` 5, ``color`` 8, ``position`` 9, ``size`` 2) and the
``background`` colour (8). The demo compares its reading of generated images with the attributes
the prompt asked for (:func:`attribute_accuracy`), and uses its penultimate layer as the feature
space of a FID between generated and real images.

The network (:class:`AttributeCNN`, any ``heads``), its trainer (:func:`fit_attribute_cnn`), the saved
form (:class:`AttributeClassifier`) and :func:`attribute_accuracy` are generic; the faces demo's
reader (:mod:`ldm_jax.examples.faces_demo.attributes`) uses them with its own heads and data.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.data import shapes as shapes_lib
from ldm_jax.models.conv import conv_general_dilated

__all__ = ["HEADS", "AttributeCNN", "AttributeClassifier", "train_attribute_classifier", "fit_attribute_cnn",
           "attribute_accuracy", "labels_from_examples"]

HEADS = {"shape": len(shapes_lib.SHAPES), "color": len(shapes_lib.COLORS),
         "position": len(shapes_lib.POSITIONS), "size": len(shapes_lib.SIZES),
         "background": len(shapes_lib.COLORS)}


ARCH_VERSION = 2  # bumped whenever AttributeCNN's layers change, so stale saved classifiers are retrained


class AttributeCNN(nn.Module):
    """[N,S,S,3] in [-1,1] -> (features [N,feature_dim], {head: logits [N,classes]}).

    ``heads``: ``((name, classes), ...)``; the shapes heads (:data:`HEADS`) by default."""

    width: int = 32
    feature_dim: int = 128
    heads: tuple = tuple(HEADS.items())

    @nn.compact
    def __call__(self, x):
        # one thin full-resolution layer (edges of small shapes), then stride 2 at every layer
        for i, (mult, stride) in enumerate(((1, 1), (2, 2), (2, 2), (4, 2))):
            x = nn.relu(nn.Conv(int(self.width * mult), (3, 3), strides=stride, name=f"conv{i}",
                                conv_general_dilated=conv_general_dilated)(x))
        x = x.reshape(x.shape[0], -1)  # keep the spatial layout: position is a head
        feats = nn.relu(nn.Dense(self.feature_dim, name="features")(x))
        return feats, {k: nn.Dense(n, name=f"head_{k}")(feats) for k, n in self.heads}


def labels_from_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``make_example`` dicts -> ``{head: int32 [N]}`` (the first shape's attributes)."""
    out = {k: np.asarray([int(np.asarray(ex[k]).reshape(-1)[0]) for ex in examples], np.int32)
           for k in ("shape", "color", "position", "size")}
    out["background"] = np.asarray([int(ex["background"]) for ex in examples], np.int32)
    return out


def _to_input(images, image_size: int) -> jnp.ndarray:
    """uint8 (or float in [0,1]) [N,H,W,3] -> float32 [N,S,S,3] in [-1,1], resized if needed."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N,H,W,3], got shape {images.shape}")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"the attribute classifier needs square images, got {images.shape[1:3]}")
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    x = jnp.asarray(x * 2.0 - 1.0)
    if images.shape[1] != image_size:
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), "linear")
    return x


@dataclasses.dataclass
class AttributeClassifier:
    """A trained :class:`AttributeCNN` with its params and input size (``info``: any JSON metadata,
    e.g. the accuracy measured after training, saved and loaded with it)."""

    module: AttributeCNN
    params: Any
    image_size: int
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, x))

    def _run(self, images, batch_size: int = 256):
        feats, logits = [], {k: [] for k, _ in self.module.heads}
        for i in range(0, len(images), batch_size):
            f, lg = self._apply(self.params, _to_input(images[i:i + batch_size], self.image_size))
            feats.append(np.asarray(f))
            for k in logits:
                logits[k].append(np.asarray(lg[k]))
        return np.concatenate(feats), {k: np.concatenate(v) for k, v in logits.items()}

    def predict(self, images) -> dict[str, np.ndarray]:
        """uint8 [N,H,W,3] -> ``{head: int32 [N]}`` predicted classes."""
        return {k: v.argmax(-1).astype(np.int32) for k, v in self._run(images)[1].items()}

    def features(self, images) -> np.ndarray:
        """uint8 [N,H,W,3] -> float32 [N, feature_dim] (penultimate layer, for FID)."""
        return self._run(images)[0]

    def save(self, path: str) -> None:
        """``path.npz`` (params) + ``path.json`` (sizes); written to temp names, then renamed."""
        from flax import traverse_util

        flat = traverse_util.flatten_dict(jax.device_get(self.params), sep="/")
        np.savez(path + ".tmp.npz", **flat)
        with open(path + ".tmp.json", "w") as f:
            json.dump({"version": ARCH_VERSION, "image_size": self.image_size, "width": self.module.width,
                       "feature_dim": self.module.feature_dim, "heads": [list(h) for h in self.module.heads],
                       "info": self.info}, f)
        os.replace(path + ".tmp.npz", path + ".npz")
        os.replace(path + ".tmp.json", path + ".json")

    @classmethod
    def load(cls, path: str) -> "AttributeClassifier":
        from flax import traverse_util

        if not (os.path.isfile(path + ".npz") and os.path.isfile(path + ".json")):
            raise FileNotFoundError(f"no attribute classifier at {path}(.npz/.json)")
        with open(path + ".json") as f:
            meta = json.load(f)
        if meta.get("version", 1) != ARCH_VERSION:
            raise ValueError(f"{path} holds a version-{meta.get('version', 1)} attribute classifier; this code "
                             f"builds version {ARCH_VERSION} (retrain it)")
        with np.load(path + ".npz") as z:
            params = traverse_util.unflatten_dict({k: z[k] for k in z.files}, sep="/")
        heads = tuple((str(k), int(n)) for k, n in meta.get("heads", HEADS.items()))
        return cls(AttributeCNN(meta["width"], meta["feature_dim"], heads), params, int(meta["image_size"]),
                   meta.get("info", {}))


def train_attribute_classifier(image_size: int, seed: int = 0, num_images: int = 4000, steps: int = 600,
                               batch_size: int = 64, lr: float = 2e-3, max_shapes: int = 1,
                               augment: bool = True, shape_scale: float = 1.0,
                               progress: bool = True, compiler_options: dict | None = None) -> AttributeClassifier:
    """Train on ``num_images`` real train-split scenes (``make_example(seed, "train", i, ...)``).

    Every colour and shape occurs in the train split, but some (shape, colour) *pairs* never do;
    a classifier trained on it learns that correlation and misreads held-out pairs. So each batch
    recolours its scenes with a random permutation of the palette (images are exact palette
    colours), which makes every pair occur and keeps shape and colour independent.

    With ``augment`` each training image is also blurred (random Gaussian, sigma up to 0.8 px), noised
    (sigma up to 0.12 of the [-1,1] range) and colour-shifted (up to 0.05 per channel): real scenes are exact palette colours
    with hard edges, and a reader trained only on those misreads any generator's soft, slightly
    off-colour output (Gaussian noise of sigma 0.1 alone halves its accuracy).

    ``compiler_options``: XLA options of the jitted step (e.g. :func:`ldm_jax.runtime.ynn_options`).
    """
    examples = [shapes_lib.make_example(seed, "train", i, image_size, max_shapes=max_shapes, shape_scale=shape_scale)
                for i in range(num_images)]
    images = np.stack([ex["image"] for ex in examples])
    labels = labels_from_examples(examples)
    palette = shapes_lib.COLOR_RGB.astype(np.int32)
    index = np.argmin(((images[..., None, :].astype(np.int32) - palette) ** 2).sum(-1), axis=-1).astype(np.uint8)

    def next_batch(rng):
        idx = rng.integers(0, num_images, batch_size)
        perm = np.argsort(rng.random((batch_size, len(palette))), axis=1)  # a palette permutation per scene
        rows = np.arange(batch_size)
        batch_images = shapes_lib.COLOR_RGB[perm[rows[:, None, None], index[idx]]]
        y = {k: v[idx] for k, v in labels.items()}
        y["color"], y["background"] = perm[rows, y["color"]], perm[rows, y["background"]]
        return batch_images, y

    return fit_attribute_cnn(AttributeCNN(), image_size, next_batch, steps=steps, lr=lr, seed=seed, augment=augment,
                             progress=progress, compiler_options=compiler_options)


def fit_attribute_cnn(module: AttributeCNN, image_size: int, next_batch, *, steps: int, lr: float = 2e-3,
                      seed: int = 0, augment: bool = True, progress: bool = True,
                      compiler_options: dict | None = None, desc: str = "attribute classifier") -> AttributeClassifier:
    """Train ``module`` (one softmax cross-entropy per head, Adam with cosine decay) for ``steps``
    batches of ``next_batch(rng) -> (uint8 images [B,H,W,3], {head: int [B]})``, ``rng`` a numpy
    Generator seeded with ``seed``; with ``augment``, each batch through :func:`_augment`."""
    from tqdm.auto import tqdm

    params = module.init(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3)))["params"]
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))
    opt_state = tx.init(params)
    heads = [k for k, _ in module.heads]

    def loss_fn(p, x, y):
        _, logits = module.apply({"params": p}, x)
        return sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], y[k]).mean() for k in heads)

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def step(p, o, x, y, key):
        if augment:
            x = _augment(x, key)
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed + 1)
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        batch_images, y = next_batch(rng)
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, _to_input(batch_images, image_size),
                                       {k: jnp.asarray(v, jnp.int32) for k, v in y.items()}, sub)
    bar.close()
    return AttributeClassifier(module, jax.device_get(params), image_size)


def _augment(x: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
    """[N,S,S,3] in [-1,1] -> the same, each image blurred, noised and colour-shifted at random."""
    k_sigma, k_noise, k_amp, k_shift = jax.random.split(key, 4)
    n = x.shape[0]
    sigma = jax.random.uniform(k_sigma, (n, 1), minval=0.05, maxval=0.8)  # blur, pixels
    taps = jnp.arange(-2, 3, dtype=x.dtype)
    kernel = jnp.exp(-0.5 * (taps[None] / sigma) ** 2)
    kernel = kernel / kernel.sum(-1, keepdims=True)  # [N,5] separable Gaussian per image

    def blur_one(img, k):  # [S,S,3], [5]
        pad = jnp.pad(img, ((2, 2), (2, 2), (0, 0)), mode="edge")
        rows = sum(k[i] * pad[i:i + img.shape[0], 2:2 + img.shape[1]] for i in range(5))
        rows = jnp.pad(rows, ((0, 0), (2, 2), (0, 0)), mode="edge")
        return sum(k[i] * rows[:, i:i + img.shape[1]] for i in range(5))

    x = jax.vmap(blur_one)(x, kernel)
    amp = jax.random.uniform(k_amp, (n, 1, 1, 1), maxval=0.12)
    x = x + amp * jax.random.normal(k_noise, x.shape, x.dtype)
    x = x + jax.random.uniform(k_shift, (n, 1, 1, 3), minval=-0.05, maxval=0.05)
    return jnp.clip(x, -1.0, 1.0)


def attribute_accuracy(predictions: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                       attributes: Sequence[str] = ("color", "shape", "position")) -> dict[str, float]:
    """Per-attribute accuracy, their ``mean``, and ``all`` (fraction with every attribute right)."""
    if not attributes:
        raise ValueError("attribute_accuracy needs at least one attribute")
    right = {k: np.asarray(predictions[k]) == np.asarray(labels[k]) for k in attributes}
    out = {k: float(v.mean()) for k, v in right.items()}
    out["mean"] = float(np.mean([out[k] for k in attributes]))
    out["all"] = float(np.logical_and.reduce([right[k] for k in attributes]).mean())
    return out
