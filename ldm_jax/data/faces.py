"""Procedural cartoon faces with CelebA-style captions: an offline stand-in for MM-CelebA-HQ text-to-face.

Every image is a pure function of ``(seed, split, index)`` (:func:`make_example`): six attributes
(:data:`ATTRIBUTES`) drawn by :func:`render_face` with PIL, plus ten caption sentences in the
MM-CelebA-HQ style from varied templates (:func:`caption_for`), e.g.::

    The person has brown hair and a beard. He is wearing eyeglasses and a hat.
    This woman is smiling, has red hair, and is wearing lipstick.
    She has gray hair, no smile, and lipstick.

:func:`write_faces_dataset` writes MM-CelebA-HQ's layout (``images/<id>.png``, ``text/<id>.txt`` with
one caption per line, plus ``attributes.jsonl`` with the labels) once, deterministic from the seed.
Some attribute *combinations* (:data:`HELDOUT_COMBOS`, 28 of 160) never occur in the train split;
the ``heldout`` split uses only them, to measure prompt adherence on unseen combinations. It is
written under ``root/heldout/`` (the same layout), so reading ``root`` gives the train split alone.

Design choices (what makes each attribute legible at 32 px, and learnable by a small diffusion model
trained for minutes on CPU, through an f=4 autoencoder that sees the image as 8x8 latents):

* Everything is drawn on a canvas of at least 128 px and area-downsampled, so a 16 or 32 px face is
  anti-aliased rather than a jagged mix of 1-pixel features.
* Hair (5 colours) is a large cap around the head with a fringe, 3-4 px wide at 32 px on the top and
  both sides, so it stays visible under a hat. A beard is the lower face in the hair colour (a real
  beard's colour follows the hair's, and it keeps the colour palette small).
* Eyeglasses are two pale lenses in dark frames with a bridge and arms, a bar across the whole face.
* Smiling is an open D-shaped mouth with a row of teeth; not smiling a closed mouth (a short line).
* Lipstick turns the lips a saturated crimson and thickens them; without, lips are a darker skin shade.
* A hat (one colour, royal blue) is a crown plus brim over the top of the head.
* Gender, age, hair style and CelebA's finer attributes (arched eyebrows, high cheekbones...) are
  left out: at 32 px they would be a pixel or two of difference, and no reader could measure them.
* Nuisance variation, not in the captions: skin tone (3), background colour (4), face position
  (up to 1.5 px at 32 px each way) and face size (+-4%).

Captions: hair colour and every *present* attribute are named in every caption (MM-CelebA-HQ
captions mostly name present attributes); an absent one is stated negatively ("has no beard", "is
not wearing a hat") with probability :data:`NEGATIVE_MENTION_P`, else omitted. Hence a caption never
leaves a present attribute unsaid: an omitted attribute always means "absent", a negated one too,
and the model can learn both "no hat" and "hat unspecified" as "no hat". The evaluation prompt
(:func:`prompt_for`) names the hair and the present attributes, as the captions do; its form is also
one of the caption templates, so it is in the training distribution (for the seen combinations).
``prompt_for(..., negations=True)`` also states every absent one: a test of reading negation, which a
text encoder trained from nothing on these captions learns last (a bag of words reads "no hat" as "hat").
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTES", "ATTRIBUTE_NAMES", "BINARY_ATTRIBUTES", "HAIR_RGB", "SKIN_RGB", "BACKGROUND_RGB", "SPLITS",
    "ALL_COMBOS", "HELDOUT_COMBOS", "TRAIN_COMBOS", "NEGATIVE_MENTION_P", "combo", "attrs_from_combo",
    "normalize_attrs", "render_face", "caption_for", "prompt_for", "parse_caption", "make_example",
    "write_faces_dataset", "read_attributes", "labels_from_attrs",
]

# The attribute schema: name -> value names (a label is the index into the tuple).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "hair": ("black", "blond", "brown", "red", "gray"),
    "eyeglasses": ("no", "yes"),
    "smiling": ("no", "yes"),
    "hat": ("no", "yes"),
    "beard": ("no", "yes"),
    "lipstick": ("no", "yes"),
}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
BINARY_ATTRIBUTES = ATTRIBUTE_NAMES[1:]
SPLITS = ("train", "heldout")

HAIR_RGB = ((28, 24, 24), (236, 200, 84), (112, 66, 32), (204, 64, 28), (160, 160, 168))
SKIN_RGB = ((250, 222, 196), (232, 186, 148), (196, 142, 104))
BACKGROUND_RGB = ((170, 206, 240), (182, 230, 196), (212, 196, 240), (244, 238, 186))
HAT_RGB = (44, 70, 186)
FRAME_RGB = (20, 20, 24)
LENS_RGB = (214, 240, 252)
EYE_RGB = (30, 24, 24)
LIPSTICK_RGB = (222, 10, 64)
MOUTH_RGB = (92, 20, 30)
TEETH_RGB = (250, 250, 250)

_JITTER = 1.5 / 32  # max face offset, fraction of the image side (1.5 px at 32 px)
_SCALE_JITTER = 0.04
_MIN_CANVAS = 128  # drawn at >= this size, then area-downsampled

# All 160 combinations, in ATTRIBUTE_NAMES order; 28 (17.5%) held out of train. Fixing any two
# attributes leaves the others free, so every value and every *pair* of values still occurs in train:
# the held-out split tests new combinations of seen parts.
ALL_COMBOS = tuple(itertools.product(*(range(len(v)) for v in ATTRIBUTES.values())))
HELDOUT_COMBOS = frozenset(c for c in ALL_COMBOS if sum((k + 1) * v for k, v in enumerate(c)) % 6 == 0)
TRAIN_COMBOS = tuple(c for c in ALL_COMBOS if c not in HELDOUT_COMBOS)
_HELDOUT_LIST = tuple(c for c in ALL_COMBOS if c in HELDOUT_COMBOS)

# chance that a caption states an absent attribute negatively: MM-CelebA-HQ's captions name what a face
# has and seldom what it lacks (CelebA's No_Beard is the one attribute phrased as an absence)
NEGATIVE_MENTION_P = 0.2
CANONICAL_P = 0.15  # chance that a caption uses prompt_for's form


def normalize_attrs(attrs: Mapping) -> dict[str, int]:
    """``{name: index or value name or bool}`` (all six) -> ``{name: int index}``."""
    missing = [k for k in ATTRIBUTE_NAMES if k not in attrs]
    if missing:
        raise ValueError(f"faces: attributes missing: {missing} (need {ATTRIBUTE_NAMES})")
    out = {}
    for k, values in ATTRIBUTES.items():
        v = attrs[k]
        if isinstance(v, str):
            if v not in values:
                raise ValueError(f"faces: {k} must be one of {values}, got {v!r}")
            v = values.index(v)
        v = int(v)
        if not 0 <= v < len(values):
            raise ValueError(f"faces: {k} index must be in [0, {len(values)}), got {v}")
        out[k] = v
    return out


def combo(attrs: Mapping) -> tuple[int, ...]:
    """Attributes -> their combination tuple (indices in ``ATTRIBUTE_NAMES`` order)."""
    a = normalize_attrs(attrs)
    return tuple(a[k] for k in ATTRIBUTE_NAMES)


def attrs_from_combo(c) -> dict[str, int]:
    return normalize_attrs(dict(zip(ATTRIBUTE_NAMES, c)))


# ---------------------------------------------------------------------------------------------- render

def render_face(attrs: Mapping, image_size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw a cartoon face: uint8 ``[image_size, image_size, 3]``.

    ``attrs``: the six attributes (indices or value names). The nuisance (skin tone, background,
    offset, size) is drawn from ``rng`` (default: ``np.random.default_rng(0)``); ``attrs`` may fix any
    of it with ``skin`` / ``background`` (indices into ``SKIN_RGB`` / ``BACKGROUND_RGB``), ``offset``
    (dx, dy as fractions of the image side) and ``scale``.
    """
    if not 8 <= image_size <= 1024:
        raise ValueError(f"image_size must be in [8, 1024], got {image_size}")
    a = normalize_attrs(attrs)
    rng = np.random.default_rng(0) if rng is None else rng
    skin = int(attrs.get("skin", rng.integers(len(SKIN_RGB))))
    background = int(attrs.get("background", rng.integers(len(BACKGROUND_RGB))))
    dx, dy = attrs.get("offset", rng.uniform(-_JITTER, _JITTER, size=2))
    scale = float(attrs.get("scale", 1.0 + rng.uniform(-_SCALE_JITTER, _SCALE_JITTER)))

    ss = max(1, math.ceil(_MIN_CANVAS / image_size))
    size = image_size * ss
    img = Image.new("RGB", (size, size), BACKGROUND_RGB[background])
    draw = ImageDraw.Draw(img)
    cx, cy = 0.5 + float(dx), 0.0 + float(dy)

    def box(x0, y0, x1, y1):  # face-relative units (1 = image side at scale 1) -> canvas pixels
        return [size * (cx + scale * x0), size * (cy + scale * y0), size * (cx + scale * x1), size * (cy + scale * y1)]

    def w(t):  # a line width
        return max(1, round(size * scale * t))

    hair = HAIR_RGB[a["hair"]]
    skin_rgb = SKIN_RGB[skin]
    lip_plain = tuple(int(v * 0.62) for v in skin_rgb)

    # hair: a cap around the head, visible above and on both sides down to the jaw
    draw.ellipse(box(-0.36, 0.14, 0.36, 0.86), fill=hair)
    # face
    draw.ellipse(box(-0.26, 0.25, 0.26, 0.87), fill=skin_rgb)
    # fringe over the forehead
    draw.chord(box(-0.27, 0.22, 0.27, 0.50), 180, 360, fill=hair)
    # beard: the lower face, in the hair colour, a little past the chin
    if a["beard"]:
        draw.chord(box(-0.28, 0.40, 0.28, 0.92), 0, 180, fill=hair)
    # eyes
    for ex in (-0.11, 0.11):
        if a["eyeglasses"]:
            draw.rectangle(box(ex - 0.09, 0.45, ex + 0.09, 0.57), fill=LENS_RGB, outline=FRAME_RGB, width=w(0.03))
        draw.ellipse(box(ex - 0.035, 0.475, ex + 0.035, 0.545), fill=EYE_RGB)
    if a["eyeglasses"]:
        draw.line(box(-0.03, 0.49, 0.03, 0.49), fill=FRAME_RGB, width=w(0.03))  # bridge
        for sgn in (-1, 1):  # arms to the edge of the face
            draw.line(box(sgn * 0.20, 0.48, sgn * 0.26, 0.47), fill=FRAME_RGB, width=w(0.03))
    # nose
    draw.line(box(0.0, 0.57, 0.015, 0.63), fill=lip_plain, width=w(0.02))
    # mouth
    lip = LIPSTICK_RGB if a["lipstick"] else lip_plain
    if a["smiling"]:
        # an open smile: lower half of an ellipse, teeth along the top
        draw.chord(box(-0.17, 0.54, 0.17, 0.82), 0, 180, fill=MOUTH_RGB, outline=lip,
                   width=w(0.045 if a["lipstick"] else 0.025))
        draw.rectangle(box(-0.13, 0.68, 0.13, 0.735), fill=TEETH_RGB)
        if a["lipstick"]:
            draw.line(box(-0.17, 0.675, 0.17, 0.675), fill=lip, width=w(0.04))
    elif a["lipstick"]:
        draw.ellipse(box(-0.14, 0.68, 0.14, 0.77), fill=lip)
        draw.line(box(-0.12, 0.725, 0.12, 0.725), fill=MOUTH_RGB, width=w(0.012))
    else:  # a closed mouth: a short line
        draw.line(box(-0.11, 0.725, 0.11, 0.725), fill=lip, width=w(0.03))
    # hat: crown and brim over the top of the head
    if a["hat"]:
        draw.rounded_rectangle(box(-0.22, 0.05, 0.22, 0.30), radius=size * scale * 0.06, fill=HAT_RGB)
        draw.rectangle(box(-0.36, 0.24, 0.36, 0.31), fill=HAT_RGB)
    if ss > 1:
        img = img.resize((image_size, image_size), Image.BOX)
    return np.asarray(img)


# -------------------------------------------------------------------------------------------- captions

# Each mention is (group, phrase): "has" and "wearing" phrases are nouns that share a verb when a
# caption lists several ("has blond hair and a beard", "is wearing eyeglasses, a hat, and lipstick");
# "free" phrases are whole predicates.
_POSITIVE = {
    "eyeglasses": (("wearing", "eyeglasses"), ("wearing", "glasses"), ("has", "eyeglasses"), ("free", "wears eyeglasses")),
    "smiling": (("free", "is smiling"), ("has", "a smile"), ("has", "a big smile")),
    "hat": (("wearing", "a hat"), ("free", "wears a hat"), ("has", "a hat")),
    "beard": (("has", "a beard"), ("free", "has a beard"), ("has", "a full beard")),
    "lipstick": (("wearing", "lipstick"), ("wearing", "red lipstick"), ("has", "lipstick"), ("free", "wears lipstick")),
}
_NEGATIVE = {
    "eyeglasses": (("has", "no eyeglasses"), ("free", "is not wearing eyeglasses"), ("free", "does not wear glasses")),
    "smiling": (("has", "no smile"), ("free", "is not smiling"), ("has", "a neutral expression")),
    "hat": (("has", "no hat"), ("free", "is not wearing a hat"), ("free", "wears no hat")),
    "beard": (("has", "no beard"), ("free", "is clean-shaven"), ("free", "has no beard")),
    "lipstick": (("has", "no lipstick"), ("free", "is not wearing lipstick"), ("free", "wears no lipstick")),
}
_SUBJECTS = {
    "man": (("This man", "The man", "He"), "He"),
    "woman": (("This woman", "The woman", "She"), "She"),
    "person": (("The person", "This person"), "The person"),
}


def _pick(options, rng):
    return options[int(rng.integers(len(options)))]


def _join(items) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + ", and " + items[-1]


def _gender(a: Mapping[str, int], rng: np.random.Generator) -> str:
    """The caption's subject: a beard reads as a man, lipstick as a woman (or neutral, sometimes);
    with both, neutral; with neither, any of the three (so the subject word carries no attribute)."""
    if a["beard"] and a["lipstick"]:
        return "person"
    if a["beard"]:
        return "man" if rng.random() < 0.7 else "person"
    if a["lipstick"]:
        return "woman" if rng.random() < 0.7 else "person"
    return _pick(("man", "woman", "person"), rng)


def prompt_for(attrs: Mapping, negations: bool = False) -> str:
    """The canonical prompt, for evaluation: the hair and every present attribute, as the dataset's
    captions name them (``The person has blond hair, eyeglasses, a hat, and lipstick.``: an attribute
    left out is absent); ``negations=True`` states the absent ones too (``..., no smile, ..., no beard,
    ...``), which asks the text encoder to read negation."""
    a = normalize_attrs(attrs)
    nouns = [f"{ATTRIBUTES['hair'][a['hair']]} hair"]
    nouns += [(_POSITIVE if a[k] else _NEGATIVE)[k][0][1] if k != "smiling" else ("a smile" if a[k] else "no smile")
              for k in BINARY_ATTRIBUTES if a[k] or negations]
    return f"The person has {_join(nouns)}."


def caption_for(attrs: Mapping, rng: np.random.Generator) -> str:
    """One CelebA-style caption: hair and every present attribute named (in random order and
    phrasing), each absent one stated negatively with probability ``NEGATIVE_MENTION_P``."""
    a = normalize_attrs(attrs)
    if rng.random() < CANONICAL_P:
        return prompt_for(a)
    mentions = [("has", f"{ATTRIBUTES['hair'][a['hair']]} hair")]
    for k in BINARY_ATTRIBUTES:
        if a[k]:
            mentions.append(_pick(_POSITIVE[k], rng))
        elif rng.random() < NEGATIVE_MENTION_P:
            mentions.append(_pick(_NEGATIVE[k], rng))
    order = rng.permutation(len(mentions))
    predicates, groups = [], {}
    for i in order:
        group, phrase = mentions[i]
        if group == "free":
            predicates.append([phrase])
        elif group in groups:
            groups[group].append(phrase)
        else:
            groups[group] = [phrase]
            predicates.append(groups[group])  # the group's predicate sits where it first appears
    wearing_verb = _pick(("is wearing", "wears"), rng)
    texts = []
    for p in predicates:
        if p is groups.get("has"):
            texts.append("has " + _join(p))
        elif p is groups.get("wearing"):
            texts.append(f"{wearing_verb} " + _join(p))
        else:
            texts.append(p[0])
    subjects, pronoun = _SUBJECTS[_gender(a, rng)]
    subject = _pick(subjects, rng)
    if len(texts) >= 2 and rng.random() < 0.5:
        k = int(rng.integers(1, len(texts)))
        return f"{subject} {_join(texts[:k])}. {pronoun} {_join(texts[k:])}."
    return f"{subject} {_join(texts)}."


_HAIR_RE = re.compile(r"\b(" + "|".join(ATTRIBUTES["hair"]) + r") hair\b")
_NEG_RE = {
    "eyeglasses": re.compile(r"\b(no (eye)?glasses|not wearing (eye)?glasses|does not wear (eye)?glasses)\b"),
    "smiling": re.compile(r"\b(no smile|not smiling|a neutral expression)\b"),
    "hat": re.compile(r"\b(no hat|not wearing a hat)\b"),
    "beard": re.compile(r"\b(no beard|clean-shaven)\b"),
    "lipstick": re.compile(r"\b(no lipstick|not wearing lipstick)\b"),
}
_POS_RE = {
    "eyeglasses": re.compile(r"\b(eye)?glasses\b"),
    "smiling": re.compile(r"\b(smile|smiling)\b"),
    "hat": re.compile(r"\bhat\b"),
    "beard": re.compile(r"\bbeard\b"),
    "lipstick": re.compile(r"\blipstick\b"),
}


def parse_caption(text: str) -> dict[str, int]:
    """The attributes a caption states: ``{name: index}`` for those it mentions (negated or not).

    Raises ``ValueError`` if it states one both ways or names two hair colours."""
    t = text.lower()
    out = {}
    hair = set(_HAIR_RE.findall(t))
    if len(hair) > 1:
        raise ValueError(f"caption names several hair colours: {text!r}")
    if hair:
        out["hair"] = ATTRIBUTES["hair"].index(hair.pop())
    for k in BINARY_ATTRIBUTES:
        neg = bool(_NEG_RE[k].search(t))
        pos = bool(_POS_RE[k].search(_NEG_RE[k].sub(" ", t)))
        if neg and pos:
            raise ValueError(f"caption states {k} both ways: {text!r}")
        if neg or pos:
            out[k] = int(pos)
    return out


# -------------------------------------------------------------------------------------------- examples

def make_example(seed: int, split: str, index: int, image_size: int = 32, captions_per_image: int = 10) -> dict:
    """One face, a pure function of its arguments: ``image`` uint8 [S,S,3], ``captions`` (list of
    str), ``attributes`` ``{name: index}``, and the nuisance ``skin``, ``background`` indices.

    ``train`` draws uniformly from :data:`TRAIN_COMBOS`, ``heldout`` from :data:`HELDOUT_COMBOS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    combos = TRAIN_COMBOS if split == "train" else _HELDOUT_LIST
    attrs = attrs_from_combo(combos[int(rng.integers(len(combos)))])
    skin, background = int(rng.integers(len(SKIN_RGB))), int(rng.integers(len(BACKGROUND_RGB)))
    image = render_face(dict(attrs, skin=skin, background=background), image_size, rng)
    captions = [caption_for(attrs, rng) for _ in range(captions_per_image)]
    return {"image": image, "captions": captions, "attributes": attrs, "skin": skin, "background": background}


def labels_from_attrs(attrs_list) -> dict[str, np.ndarray]:
    """A list of attribute dicts (indices or value names) -> ``{name: int32 [N]}``."""
    rows = [normalize_attrs(a) for a in attrs_list]
    return {k: np.asarray([r[k] for r in rows], np.int32) for k in ATTRIBUTE_NAMES}


# ------------------------------------------------------------------------------------------ the writer

_FORMAT_VERSION = 2  # 2: absent attributes stated in 20% of mentions, not 50%
_MANIFEST = "manifest.json"


def _example_ids(num_train: int, num_heldout: int):
    """(id, split, index in split, folder): train ids 0..num_train-1 in ``root``, then the held-out
    ones in ``root/heldout``."""
    return ([(str(i), "train", i, "") for i in range(num_train)]
            + [(str(num_train + i), "heldout", i, "heldout") for i in range(num_heldout)])


def _complete(root: str, params: dict) -> bool:
    try:
        with open(os.path.join(root, _MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params:
        raise ValueError(f"faces: {root} holds a dataset made with {manifest.get('params')}, not {params}; "
                         "use another directory")
    ids = _example_ids(params["num_train"], params["num_heldout"])
    return (all(os.path.isfile(os.path.join(root, d, "images", f"{i}.png")) for i, _, _, d in ids)
            and all(os.path.isfile(os.path.join(root, d, "text", f"{i}.txt")) for i, _, _, d in ids)
            and os.path.isfile(os.path.join(root, "attributes.jsonl")))


def write_faces_dataset(root: str | os.PathLike, *, image_size: int = 32, num_train: int = 4000,
                        num_heldout: int = 400, seed: int = 0, captions_per_image: int = 10) -> dict:
    """Write (once) the MM-CelebA-HQ layout under ``root``:

    * ``images/<id>.png``: the train split's faces (ids ``0..num_train-1``);
    * ``text/<id>.txt``: their ``captions_per_image`` captions, one a line;
    * ``heldout/images/<id>.png``, ``heldout/text/<id>.txt``: the held-out split, the same layout
      (ids ``num_train..num_train+num_heldout-1``). Kept out of ``root/images`` so that a reader of
      ``root`` (e.g. ``FolderSource(root)``, which has no split lists) trains on the train split only;
    * ``attributes.jsonl``: one ``{"id", "split", "image", <attribute>: <value name>...}`` row per
      image, both splits (``image``: the path relative to ``root``);
    * ``manifest.json``: the generation parameters, written last (the completion mark).

    A complete dataset with the same parameters is reused; one with other parameters raises
    ``ValueError``; a partial one (no manifest) is rewritten. Returns the manifest plus ``root`` and
    ``reused`` (bool).
    """
    root = os.fspath(root)
    for k, v in (("num_train", num_train), ("captions_per_image", captions_per_image)):
        if v < 1:
            raise ValueError(f"faces: {k} must be >= 1, got {v}")
    if num_heldout < 0:
        raise ValueError(f"faces: num_heldout must be >= 0, got {num_heldout}")
    params = {"format": _FORMAT_VERSION, "image_size": int(image_size), "num_train": int(num_train),
              "num_heldout": int(num_heldout), "seed": int(seed), "captions_per_image": int(captions_per_image)}
    if _complete(root, params):
        return {"params": params, "root": root, "reused": True}
    if os.path.exists(os.path.join(root, _MANIFEST)):  # an incomplete dataset: its mark goes first
        os.remove(os.path.join(root, _MANIFEST))
    for d in ("", "heldout") if num_heldout else ("",):
        for sub in ("images", "text"):
            os.makedirs(os.path.join(root, d, sub), exist_ok=True)
    rows = []
    for id_, split, i, d in _example_ids(num_train, num_heldout):
        ex = make_example(seed, split, i, image_size, captions_per_image)
        image = os.path.join(d, "images", f"{id_}.png")
        Image.fromarray(ex["image"]).save(os.path.join(root, image), compress_level=1)
        with open(os.path.join(root, d, "text", f"{id_}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(ex["captions"]) + "\n")
        rows.append({"id": id_, "split": split, "image": image.replace(os.sep, "/"),
                     **{k: ATTRIBUTES[k][v] for k, v in ex["attributes"].items()}})
    with open(os.path.join(root, "attributes.jsonl.tmp"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(os.path.join(root, "attributes.jsonl.tmp"), os.path.join(root, "attributes.jsonl"))
    manifest = {"params": params, "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
                "heldout_combos": sorted(list(c) for c in HELDOUT_COMBOS)}
    with open(os.path.join(root, _MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f)
    os.replace(os.path.join(root, _MANIFEST + ".tmp"), os.path.join(root, _MANIFEST))
    return {"params": params, "root": root, "reused": False}


def read_attributes(root: str | os.PathLike, split: str | None = None) -> list[dict]:
    """The rows of ``root/attributes.jsonl`` (all, or one split's), attributes as value names."""
    with open(os.path.join(os.fspath(root), "attributes.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]
