"""Attribute reader for the cartoon faces (:mod:`ldm_jax.data.faces`): what a generated face shows.

The shapes demo's generic classifier (:class:`~ldm_jax.examples.shapes_demo.attributes.AttributeCNN`
trained by :func:`~ldm_jax.examples.shapes_demo.attributes.fit_attribute_cnn`) with one head per
face attribute (hair 5, eyeglasses / smiling / hat / beard / lipstick 2 each), trained on rendered
train-split faces with blur / noise / colour-shift augmentation (so that a generator's soft,
slightly noisy output still reads right). After training it measures itself on fresh train-split
renders (``seen`` combinations) and on the held-out split (combinations it never saw): below ~0.97
on any attribute, that attribute is not legible and the renderer needs fixing.

    reader = train_face_reader(32)
    reader.report            # {"seen": {...}, "heldout": {...}} accuracies on clean renders
    reader.read(images)      # {attribute: int32 [N]}
    reader.accuracy(images, [faces.normalize_attrs(a) for a in asked])  # per attribute, mean, all
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import numpy as np

from ldm_jax.data import faces
from ldm_jax.examples.shapes_demo.attributes import (AttributeClassifier, AttributeCNN, attribute_accuracy,
                                                     fit_attribute_cnn)

__all__ = ["HEADS", "FaceReader", "train_face_reader", "load_or_train_face_reader", "real_faces"]

HEADS = tuple((k, len(v)) for k, v in faces.ATTRIBUTES.items())


def _labels(attrs) -> dict[str, np.ndarray]:
    """A list of attribute dicts, or ``{name: [N]}`` arrays -> ``{name: int32 [N]}``."""
    if isinstance(attrs, Mapping):
        return {k: np.asarray(attrs[k], np.int32) for k in faces.ATTRIBUTE_NAMES}
    return faces.labels_from_attrs(attrs)


def real_faces(seed: int, split: str, num: int, image_size: int, start: int = 0):
    """Rendered faces of a split (no captions): (uint8 [N,S,S,3], ``{name: int32 [N]}``)."""
    exs = [faces.make_example(seed, split, start + i, image_size, captions_per_image=0) for i in range(num)]
    return np.stack([e["image"] for e in exs]), faces.labels_from_attrs([e["attributes"] for e in exs])


@dataclasses.dataclass
class FaceReader:
    """A trained face-attribute classifier. ``report``: its accuracy on clean renders after training."""

    classifier: AttributeClassifier

    @property
    def image_size(self) -> int:
        return self.classifier.image_size

    @property
    def report(self) -> dict:
        return self.classifier.info.get("report", {})

    def read(self, images) -> dict[str, np.ndarray]:
        """uint8 [N,H,W,3] (square; resized to the reader's size) -> ``{attribute: int32 [N]}``."""
        return self.classifier.predict(images)

    def accuracy(self, images, attrs) -> dict[str, float]:
        """Per-attribute accuracy of :meth:`read` against ``attrs`` (a list of attribute dicts, or
        ``{name: [N]}``), their ``mean``, and ``all`` (fraction of images with every attribute right)."""
        return attribute_accuracy(self.read(images), _labels(attrs), faces.ATTRIBUTE_NAMES)

    def features(self, images) -> np.ndarray:
        """float32 [N, feature_dim]: the penultimate layer (a feature space for FID)."""
        return self.classifier.features(images)

    def save(self, path: str) -> None:
        """``path.npz`` (params) + ``path.json`` (sizes, heads, report)."""
        self.classifier.save(path)

    @classmethod
    def load(cls, path: str) -> "FaceReader":
        clf = AttributeClassifier.load(path)
        if tuple(clf.module.heads) != HEADS:
            raise ValueError(f"{path} is not a face-attribute reader (heads {clf.module.heads}, want {HEADS})")
        return cls(clf)


def train_face_reader(image_size: int = 32, seed: int = 0, num_images: int = 2000, steps: int = 400,
                      batch_size: int = 64, lr: float = 2e-3, augment: bool = True, num_eval: int = 400,
                      width: int = 32, progress: bool = True, compiler_options: dict | None = None) -> FaceReader:
    """Train on ``num_images`` train-split renders (``faces.make_example(seed, "train", i)``), then
    measure on ``num_eval`` fresh train-split renders (``seen``) and ``num_eval`` held-out-split ones
    (``heldout``: combinations never trained on); both go to ``report``."""
    images, labels = real_faces(seed, "train", num_images, image_size)

    def next_batch(rng):
        idx = rng.integers(0, num_images, batch_size)
        return images[idx], {k: v[idx] for k, v in labels.items()}

    clf = fit_attribute_cnn(AttributeCNN(width=width, heads=HEADS), image_size, next_batch, steps=steps, lr=lr,
                            seed=seed, augment=augment, progress=progress, compiler_options=compiler_options,
                            desc="face attribute reader")
    reader = FaceReader(clf)
    report = {}
    if num_eval > 0:
        for name, split, start in (("seen", "train", num_images), ("heldout", "heldout", 0)):
            ev_images, ev_labels = real_faces(seed, split, num_eval, image_size, start=start)
            report[name] = reader.accuracy(ev_images, ev_labels)
    clf.info = {"report": report, "trained_on": {"seed": seed, "num_images": num_images, "steps": steps,
                                                  "batch_size": batch_size, "lr": lr, "augment": augment}}
    return reader


def load_or_train_face_reader(path: str, **train_kwargs) -> FaceReader:
    """The reader saved at ``path`` (``.npz`` + ``.json``), else one trained with ``train_kwargs``
    and saved there."""
    if os.path.isfile(path + ".npz") and os.path.isfile(path + ".json"):
        try:
            return FaceReader.load(path)
        except (ValueError, OSError, KeyError) as err:  # stale architecture or a half-written file
            print(f"[faces] retraining the face attribute reader ({err})")
    reader = train_face_reader(**train_kwargs)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    reader.save(path)
    return reader
