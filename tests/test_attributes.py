"""The attribute classifier reads real shapes_captions images, and can be wrong on wrong images."""
import numpy as np
import pytest

from ldm_jax.data.shapes import make_example
from ldm_jax.examples.shapes_demo.attributes import (AttributeClassifier, attribute_accuracy, labels_from_examples,
                                     train_attribute_classifier)


@pytest.fixture(scope="module")
def classifier():
    # A short run at the demo's shape size (the demo trains 1500 steps: shape 0.96, colour 0.99,
    # position 1.0 on validation real images), with the demo's XLA:CPU options for it (~1.4x faster here)
    from ldm_jax.examples.shapes_demo.config import get_config
    from ldm_jax.runtime import ynn_options

    return train_attribute_classifier(32, seed=0, num_images=3000, steps=600, shape_scale=SCALE, progress=False,
                                      compiler_options=ynn_options(get_config().eval.ynn_fusions))


SCALE = 1.15  # the shapes demo's data.shape_scale


def _examples(split, n=200):
    return [make_example(0, split, i, 32, max_shapes=1, shape_scale=SCALE) for i in range(n)]


# Measured after 600 steps: shape ~0.7 (small 5 px shapes are the hard part), colour 0.91-0.95,
# position and background 1.0; chance is 0.2 / 0.125 / 0.11 / 0.125.
MIN_ACCURACY = {"shape": 0.5, "color": 0.8, "position": 0.95, "background": 0.95}


def test_reads_real_images_and_heldout_pairs_as_well(classifier):
    acc = {}
    for split in ("validation", "heldout"):
        examples = _examples(split)
        pred = classifier.predict(np.stack([e["image"] for e in examples]))
        labels = labels_from_examples(examples)
        acc[split] = {h: float((pred[h] == labels[h]).mean()) for h in MIN_ACCURACY}
        for head, low in MIN_ACCURACY.items():
            assert acc[split][head] >= low, (split, acc[split])
    # palette-permutation training: unseen (shape, colour) pairs are read about as well as seen ones
    for head in ("shape", "color"):
        assert acc["heldout"][head] >= acc["validation"][head] - 0.1, acc


def test_reads_blurred_and_noisy_images(classifier):
    """Trained with blur/noise/colour-shift augmentation: a generator's soft, slightly noisy output
    of the right scene is still read right (without augmentation noise of sigma 12/255 gave 0.55)."""
    from PIL import Image, ImageFilter

    examples = _examples("validation")
    labels = labels_from_examples(examples)
    images = np.stack([e["image"] for e in examples])
    clean = attribute_accuracy(classifier.predict(images), labels)["mean"]
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.7))) for im in images])
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 12, images.shape), 0, 255).astype(np.uint8)
    for name, bad in (("blur", blurred), ("noise", noisy)):
        acc = attribute_accuracy(classifier.predict(bad), labels)["mean"]
        assert acc >= clean - 0.1, (name, acc, clean)


def test_wrong_images_are_read_wrong(classifier):
    examples = _examples("validation", 64)
    labels = labels_from_examples(examples)
    images = np.stack([e["image"] for e in examples])
    flat = np.broadcast_to(images.mean(axis=(1, 2), keepdims=True).astype(np.uint8), images.shape)
    shuffled = np.stack([im.reshape(-1, 3)[np.random.default_rng(i).permutation(32 * 32)].reshape(32, 32, 3)
                         for i, im in enumerate(images)])
    for bad in (flat, shuffled):
        acc = attribute_accuracy(classifier.predict(bad), labels)
        assert acc["all"] < 0.3 and acc["position"] < 0.5


def test_features_and_save_load(classifier, tmp_path):
    images = np.stack([e["image"] for e in _examples("validation", 16)])
    feats = classifier.features(images)
    assert feats.shape == (16, classifier.module.feature_dim) and np.isfinite(feats).all()
    path = str(tmp_path / "clf")
    classifier.save(path)
    again = AttributeClassifier.load(path)
    for k, v in classifier.predict(images).items():
        np.testing.assert_array_equal(again.predict(images)[k], v)
    # 64 px images are resized to the classifier's 32 px
    big = np.stack([e["image"] for e in [make_example(0, "validation", i, 64, max_shapes=1) for i in range(16)]])
    assert classifier.predict(big)["color"].shape == (16,)
    with pytest.raises(ValueError, match="square"):
        classifier.predict(images[:, :, :20])
    with pytest.raises(FileNotFoundError):
        AttributeClassifier.load(str(tmp_path / "missing"))


def test_attribute_accuracy_by_hand():
    labels = {"color": np.array([0, 1, 2, 3]), "shape": np.array([0, 0, 1, 1]), "position": np.array([4, 4, 4, 4])}
    pred = {"color": np.array([0, 1, 0, 3]), "shape": np.array([0, 0, 1, 0]), "position": np.array([4, 4, 4, 4])}
    acc = attribute_accuracy(pred, labels)
    assert acc == {"color": 0.75, "shape": 0.75, "position": 1.0, "mean": pytest.approx(2.5 / 3), "all": 0.5}


def test_max_shapes_one_and_default_unchanged():
    one = [make_example(3, "train", i, 32, max_shapes=1) for i in range(20)]
    assert all(e["num_shapes"] == 1 for e in one)
    assert make_example(3, "train", 5, 32, max_shapes=1)["caption"] == one[5]["caption"]
    a, b = make_example(3, "train", 7, 32), make_example(3, "train", 7, 32, max_shapes=2)
    assert a["caption"] == b["caption"] and np.array_equal(a["image"], b["image"])
    with pytest.raises(ValueError, match="max_shapes"):
        make_example(0, "train", 0, 32, max_shapes=3)
