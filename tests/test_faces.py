"""The cartoon-faces stand-in for MM-CelebA-HQ: rendering, captions, the written layout, held-out
combinations, and the attribute reader."""
import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import faces as F

NUISANCE = dict(skin=1, background=0, offset=(0.0, 0.0), scale=1.0)
BASES = [dict(hair=0, eyeglasses=0, smiling=0, hat=0, beard=0, lipstick=0),
         dict(hair=3, eyeglasses=1, smiling=1, hat=1, beard=1, lipstick=1)]


def test_render_is_deterministic_and_sized():
    attrs = BASES[1]
    for size in (16, 32, 64):
        a = F.render_face(attrs, size, np.random.default_rng(3))
        assert a.shape == (size, size, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, F.render_face(attrs, size, np.random.default_rng(3)))
    # the nuisance comes from the rng: another seed moves/recolours the face
    assert not np.array_equal(F.render_face(attrs, 32, np.random.default_rng(3)),
                              F.render_face(attrs, 32, np.random.default_rng(4)))
    a, b = F.make_example(0, "train", 5), F.make_example(0, "train", 5)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["captions"] == b["captions"] and a["attributes"] == b["attributes"] and len(a["captions"]) == 10
    assert F.make_example(0, "train", 5, 16)["image"].shape == (16, 16, 3)
    # value names work as well as indices
    named = {k: F.ATTRIBUTES[k][v] for k, v in attrs.items()}
    np.testing.assert_array_equal(F.render_face(named, 32, np.random.default_rng(3)),
                                  F.render_face(attrs, 32, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="hair"):
        F.render_face(dict(attrs, hair="green"), 32)
    with pytest.raises(ValueError, match="missing"):
        F.render_face({"hair": 0}, 32)


@pytest.mark.parametrize("size", [16, 32])
def test_every_attribute_value_changes_the_image(size):
    for base in BASES:
        ref = F.render_face(dict(base, **NUISANCE), size).astype(int)
        for name, values in F.ATTRIBUTES.items():
            for v in range(len(values)):
                if v == base[name]:
                    continue
                img = F.render_face(dict(base, **NUISANCE, **{name: v}), size).astype(int)
                changed = (np.abs(img - ref).max(-1) > 40).sum()
                # at least ~1.5% of the image (4 px at 16 px, 15 at 32 px) changes clearly
                assert changed >= size * size // 64, (base, name, v, changed)


def _captions(n=150, split="train"):
    return [F.make_example(1, split, i, 16) for i in range(n)]


def test_captions_name_the_attributes_and_never_contradict():
    negatives, forms, seen_canonical = 0, set(), False
    for ex in _captions() + _captions(40, "heldout"):
        labels = ex["attributes"]
        assert len(ex["captions"]) == 10
        for c in ex["captions"]:
            said = F.parse_caption(c)
            assert all(said[k] == labels[k] for k in said), (c, labels)  # no contradiction
            present = {k for k in F.BINARY_ATTRIBUTES if labels[k]}
            assert {"hair"} | present <= set(said), (c, labels)  # hair and every present attribute named
            negatives += sum(1 for k, v in said.items() if k != "hair" and v == 0)
            forms.add(c.split(" ")[0])
            seen_canonical |= c == F.prompt_for(labels)
            assert c[0].isupper() and c.endswith(".")
            # the subject never contradicts a beard or lipstick
            words = set(c.replace(".", " ").replace(",", " ").split())
            if labels["beard"]:
                assert not words & {"She", "woman"}, c
            if labels["lipstick"]:
                assert not words & {"He", "man"}, c
        assert len(set(ex["captions"])) >= 5  # varied phrasing
    assert negatives > 500 and seen_canonical and {"The", "This", "He", "She"} <= forms


def test_prompt_and_parser():
    for c in F.ALL_COMBOS:
        attrs = F.attrs_from_combo(c)
        assert F.parse_caption(F.prompt_for(attrs, negations=True)) == attrs
        assert F.parse_caption(F.prompt_for(attrs)) == {k: v for k, v in attrs.items() if k == "hair" or v}
    assert F.prompt_for(BASES[0]) == "The person has black hair."
    assert (F.prompt_for(BASES[0], negations=True)
            == "The person has black hair, no eyeglasses, no smile, no hat, no beard, and no lipstick.")
    assert F.prompt_for(dict(BASES[0], hat=1, lipstick=1)) == "The person has black hair, a hat, and lipstick."
    assert F.parse_caption("She has red lipstick and brown hair.") == {"hair": 2, "lipstick": 1}
    assert F.parse_caption("This man is clean-shaven and is not wearing a hat.") == {"beard": 0, "hat": 0}
    with pytest.raises(ValueError, match="both ways"):
        F.parse_caption("He has no beard and a beard.")


def test_heldout_combinations():
    frac = len(F.HELDOUT_COMBOS) / len(F.ALL_COMBOS)
    assert len(F.ALL_COMBOS) == 160 and 0.15 <= frac <= 0.2
    # every value and every pair of values occurs in train: held-out = new combinations of seen parts
    n = len(F.ATTRIBUTE_NAMES)
    for i, j in itertools.combinations(range(n), 2):
        pairs = {(c[i], c[j]) for c in F.TRAIN_COMBOS}
        assert len(pairs) == len(F.ATTRIBUTES[F.ATTRIBUTE_NAMES[i]]) * len(F.ATTRIBUTES[F.ATTRIBUTE_NAMES[j]])
    train = {F.combo(F.make_example(0, "train", i, 16, 0)["attributes"]) for i in range(600)}
    held = {F.combo(F.make_example(0, "heldout", i, 16, 0)["attributes"]) for i in range(200)}
    assert not train & F.HELDOUT_COMBOS and held <= F.HELDOUT_COMBOS
    assert len(train) > 100 and len(held) > 20  # both splits cover most of their combinations


def test_write_layout_and_reuse(tmp_path):
    root = tmp_path / "faces"
    out = F.write_faces_dataset(root, image_size=16, num_train=12, num_heldout=4, seed=2, captions_per_image=10)
    assert out["reused"] is False
    rows = F.read_attributes(root)
    assert [r["id"] for r in rows] == [str(i) for i in range(16)]
    assert [r["split"] for r in rows] == ["train"] * 12 + ["heldout"] * 4
    assert F.read_attributes(root, "heldout") == rows[12:]
    for r in rows:
        folder = root / ("heldout" if r["split"] == "heldout" else "")
        assert r["image"] == os.path.relpath(folder / "images" / f"{r['id']}.png", root)
        img = np.asarray(Image.open(folder / "images" / f"{r['id']}.png"))
        lines = (folder / "text" / f"{r['id']}.txt").read_text().splitlines()
        assert img.shape == (16, 16, 3) and len(lines) == 10
        index = int(r["id"]) - (12 if r["split"] == "heldout" else 0)
        ex = F.make_example(2, r["split"], index, 16)
        np.testing.assert_array_equal(img, ex["image"])  # PNG: lossless
        assert lines == ex["captions"]
        assert F.normalize_attrs(r) == ex["attributes"]
        assert (F.combo(r) in F.HELDOUT_COMBOS) == (r["split"] == "heldout")
    # the train split alone in root/images, the held-out one in root/heldout/images
    assert len(os.listdir(root / "images")) == 12 and len(os.listdir(root / "heldout" / "text")) == 4
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 2 and manifest["params"]["image_size"] == 16
    # second call: reused, nothing rewritten
    stamp = os.stat(root / "images" / "3.png").st_mtime_ns
    again = F.write_faces_dataset(root, image_size=16, num_train=12, num_heldout=4, seed=2, captions_per_image=10)
    assert again["reused"] is True and os.stat(root / "images" / "3.png").st_mtime_ns == stamp
    with pytest.raises(ValueError, match="another directory"):
        F.write_faces_dataset(root, image_size=16, num_train=12, num_heldout=4, seed=3)
    # an interrupted write (a file missing) is redone
    os.remove(root / "text" / "5.txt")
    assert F.write_faces_dataset(root, image_size=16, num_train=12, num_heldout=4, seed=2)["reused"] is False
    assert len((root / "text" / "5.txt").read_text().splitlines()) == 10


@pytest.fixture(scope="module")
def reader():
    from ldm_jax.examples.faces_demo.attributes import train_face_reader

    # ~10 s on 2 CPU cores; 16 px. Measured: mean 0.996 seen / 0.991 held-out (worst: smiling, beard, lipstick 0.98-0.99).
    return train_face_reader(16, seed=0, num_images=1000, steps=150, num_eval=200, progress=False)


def test_reader_reads_clean_renders(reader, tmp_path):
    from ldm_jax.examples.faces_demo.attributes import FaceReader, real_faces

    for split in ("seen", "heldout"):
        assert reader.report[split]["mean"] > 0.9, reader.report
        assert min(reader.report[split][k] for k in F.ATTRIBUTE_NAMES) > 0.8, reader.report
    images, labels = real_faces(7, "train", 64, 16)  # another seed: new nuisance draws
    pred = reader.read(images)
    assert set(pred) == set(F.ATTRIBUTE_NAMES) and pred["hair"].shape == (64,)
    attrs = [{k: int(labels[k][i]) for k in labels} for i in range(64)]
    acc = reader.accuracy(images, attrs)
    assert acc["mean"] > 0.9 and set(acc) == set(F.ATTRIBUTE_NAMES) | {"mean", "all"}
    assert reader.accuracy(images, labels) == acc
    # 32 px renders are resized to the reader's 16 px
    big, big_labels = real_faces(7, "train", 64, 32)
    assert reader.accuracy(big, big_labels)["mean"] > 0.8
    # a flat image of the right mean colour is not read as the face
    flat = np.broadcast_to(images.mean(axis=(1, 2), keepdims=True).astype(np.uint8), images.shape)
    assert reader.accuracy(flat, labels)["all"] < 0.3
    path = str(tmp_path / "reader")
    reader.save(path)
    again = FaceReader.load(path)
    assert again.report == reader.report
    for k, v in reader.read(images).items():
        np.testing.assert_array_equal(again.read(images)[k], v)
