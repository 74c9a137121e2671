"""Fine-tuning the shapes demo's model, measured with the demo's attribute classifier.

The demo's model has never seen the word "sks". A few dozen images in which one colour (``purple``) is
captioned "sks" teach it, by

- **LoRA** (``train.trainable="lora"``: rank-4 adapters on the UNet's attention projections), or
- **textual inversion** (``train.trainable="textual_inversion"``: the placeholder ``<sks>``'s vector);

then the classifier reads the colour of samples for held-out "sks" prompts (shapes, sizes, positions
and the other colour the concept images did not fix) with and without the fine-tune. ``attribute``
picks what "sks" names: the shape's colour (the default) or the background's (what a small demo model
learns first: the suite's test).
**DreamBooth** (the whole UNet) learns one subject (a large square in the centre, "sks" naming its
purple) with and without prior preservation; the class prompt (the nearest prompt the model knows, "a
large red square in the center on a white background") should drift towards the subject without the
prior loss and much less with it.

``python -m ldm_jax.examples.shapes_demo.finetune --demo demo_out --out finetune_out`` (after
``make demo``); :func:`run_finetune` returns the figures (also ``finetune_out/metrics.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time

import numpy as np

from ldm_jax.data.shapes import COLORS

__all__ = ["WORD", "TARGET", "concept_folder", "word_prompts", "colour_rates", "finetune_config", "run_finetune"]

WORD, TARGET = "sks", "purple"


def _replace_colour(caption: str, colour: str, word: str) -> str:
    return re.sub(rf"\b{colour}\b", word, caption, count=1)


def _colour_of(ex: dict, attribute: str) -> int:
    """The colour index of ``attribute``: ``"color"`` (the shape's) or ``"background"``."""
    return int(ex["background"]) if attribute == "background" else int(ex["color"][0])


def _other_colour(ex: dict, attribute: str) -> int:
    return int(ex["color"][0]) if attribute == "background" else int(ex["background"])


def concept_folder(cfg, path: str, num: int, colour: str = TARGET, word: str = WORD, split: str = "train",
                   attribute: str = "color") -> str:
    """``num`` one-shape scenes of the demo's data whose ``attribute`` (the shape's ``"color"`` or the
    ``"background"``) is ``colour``, captioned with ``word`` instead of that colour (a ``.png`` + ``.txt``
    each)."""
    from PIL import Image

    from ldm_jax.data.shapes import make_example

    os.makedirs(path, exist_ok=True)
    c, i, made = COLORS.index(colour), 0, 0
    d = cfg.data
    while made < num:
        ex = make_example(d.seed + 7, split, i, d.image_size, max_shapes=1, shape_scale=d.shape_scale)
        i += 1
        if _colour_of(ex, attribute) != c:
            continue
        Image.fromarray(ex["image"]).save(os.path.join(path, f"{made:04d}.png"))
        with open(os.path.join(path, f"{made:04d}.txt"), "w") as f:
            f.write(_replace_colour(ex["caption"], colour, word))
        made += 1
    return path


def word_prompts(cfg, num: int, word: str, colour: str | None = None, attribute: str = "color"
                 ) -> tuple[list[str], dict]:
    """``num`` validation-split captions of one-shape scenes with the colour word of ``attribute``
    replaced by ``word`` (the original captions when ``word`` is None), and their labels."""
    from ldm_jax.data.shapes import make_example
    from ldm_jax.examples.shapes_demo.attributes import labels_from_examples

    d = cfg.data
    examples, i = [], 0
    while len(examples) < num:
        ex = make_example(d.seed + 11, "validation", i, d.image_size, max_shapes=1, shape_scale=d.shape_scale)
        i += 1
        if colour is not None and _other_colour(ex, attribute) == COLORS.index(colour):
            continue  # shape and background must differ in colour for the target to be read
        examples.append(ex)
    prompts = [ex["caption"] if word is None else _replace_colour(ex["caption"], COLORS[_colour_of(ex, attribute)], word)
               for ex in examples]
    return prompts, labels_from_examples(examples)


def _samples(pipe, cfg, prompts, guidance: float) -> np.ndarray:
    from ldm_jax.examples.shapes_demo.demo import sample_images

    return sample_images(pipe, cfg, prompts, guidance, seed=0, batch_size=128)


def colour_rates(pipe, classifier, cfg, prompts, labels, guidance: float, colour: str = TARGET,
                 attribute: str = "color") -> dict:
    """How often the classifier reads ``colour`` as ``attribute`` in the samples of ``prompts``, and its
    shape/position accuracy against ``labels``."""
    from ldm_jax.examples.shapes_demo.attributes import attribute_accuracy

    images = _samples(pipe, cfg, prompts, guidance)
    pred = classifier.predict(images)
    acc = attribute_accuracy(pred, labels)
    return {"target_colour_rate": float(np.mean(pred[attribute] == COLORS.index(colour))),
            "shape": float(acc["shape"]), "position": float(acc["position"]), "images": images}


def finetune_config(demo_dir: str, data_dir: str, trainable: str, steps: int, batch: int, lr: float,
                    source: str = "folder", **extra):
    """A fine-tuning config on the demo's model (its workdir ``demo_dir/diffusion`` as ``init.pretrained``)."""
    from ldm_jax.config_utils import load_config

    name = {"lora": "tiny_lora", "textual_inversion": "tiny_textual_inversion", "unet": "tiny_dreambooth"}[trainable]
    c = load_config(name, [f"--config.init.pretrained={os.path.join(demo_dir, 'diffusion')}"])
    with open(os.path.join(demo_dir, "diffusion", "config.json")) as f:
        trained = json.load(f)
    c.stages = [dict(resolution=int(trained["stages"][-1]["resolution"]), steps=steps, batch_size=batch)]
    c.train.update(dict(lr=lr, warmup_steps=min(20, steps // 10), decay_steps=0, progress=True, tensorboard=False,
                        log_every=25, checkpoint_every=max(steps, 1), ema_decay=0.0,
                        min_snr_gamma=trained["train"]["min_snr_gamma"], compiler_options=trained["train"]["compiler_options"]))
    c.data.update(dict(path=data_dir, source=source))
    for key, value in extra.items():
        c[key].update(value)
    return c


def run_finetune(demo_dir: str = "demo_out", out_dir: str = "finetune_out", *, num_images: int = 48,
                 num_prompts: int = 128, steps: int = 300, guidance: float = 3.0, devices=None,
                 parts=("lora", "textual_inversion", "dreambooth"), attribute: str = "color",
                 class_images: int = 64) -> dict:
    """LoRA, textual inversion and DreamBooth on the demo's model (see the module doc); returns the figures.
    ``attribute``: what "sks" names, the shape's colour (``"color"``) or the ``"background"``'s;
    ``class_images``: DreamBooth's prior images, and the class prompt's samples compared before and after."""
    import jax

    from ldm_jax.examples.shapes_demo.attributes import AttributeClassifier
    from ldm_jax.examples.shapes_demo.demo import load_demo_config
    from ldm_jax.pipeline import StableDiffusionPipeline

    devices = devices or jax.devices()[:1]
    cfg = load_demo_config(demo_dir)
    classifier = AttributeClassifier.load(os.path.join(demo_dir, "attribute_classifier"))
    os.makedirs(out_dir, exist_ok=True)
    model = os.path.join(demo_dir, "diffusion")
    base = StableDiffusionPipeline.from_pretrained(model)
    if attribute not in ("color", "background"):
        raise ValueError(f"attribute must be 'color' or 'background', got {attribute!r}")
    concept = concept_folder(cfg, os.path.join(out_dir, "concept"), num_images, attribute=attribute)
    prompts, labels = word_prompts(cfg, num_prompts, WORD, TARGET, attribute)
    metrics: dict = {"word": WORD, "target": TARGET, "attribute": attribute, "guidance": guidance,
                     "num_prompts": num_prompts, "num_images": num_images, "steps": steps, "timings_s": {}}

    def rate(pipe, p):
        out = colour_rates(pipe, classifier, cfg, p, labels, guidance, attribute=attribute)
        return {k: v for k, v in out.items() if k != "images"}

    metrics["base"] = rate(base, prompts)
    metrics["base_plain_prompts"] = rate(base, word_prompts(cfg, num_prompts, None, TARGET, attribute)[0])

    if "lora" in parts:
        _lora(demo_dir, out_dir, concept, prompts, metrics, rate, steps, devices)
    if "textual_inversion" in parts:
        _textual_inversion(demo_dir, out_dir, concept, prompts, metrics, rate, steps, devices)
    if "dreambooth" in parts:
        t = time.time()
        metrics["dreambooth"] = _dreambooth(demo_dir, out_dir, cfg, classifier, base, steps, guidance, devices,
                                            class_images, attribute)
        metrics["timings_s"]["dreambooth"] = time.time() - t
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def _lora(demo_dir, out_dir, concept, prompts, metrics, rate, steps, devices):
    from ldm_jax.pipeline import StableDiffusionPipeline
    from ldm_jax.train.diffusion_task import train

    t = time.time()
    work = os.path.join(out_dir, "lora")
    train(finetune_config(demo_dir, concept, "lora", steps, 16, 2e-3), work, devices=devices)
    lora = StableDiffusionPipeline.from_pretrained(work)
    metrics["lora"] = rate(lora, prompts)
    metrics["timings_s"]["lora"] = time.time() - t


def _textual_inversion(demo_dir, out_dir, concept, prompts, metrics, rate, steps, devices):
    """The same images, "<sks>" as the placeholder."""
    from ldm_jax.pipeline import StableDiffusionPipeline
    from ldm_jax.train.diffusion_task import train

    t = time.time()
    ti_data = os.path.join(out_dir, "concept_ti")
    if not os.path.isdir(ti_data):
        os.makedirs(ti_data)
        for name in os.listdir(concept):
            src = os.path.join(concept, name)
            if name.endswith(".txt"):
                with open(src) as f, open(os.path.join(ti_data, name), "w") as g:
                    g.write(re.sub(rf"\b{WORD}\b", f"<{WORD}>", f.read()))
            else:
                os.link(src, os.path.join(ti_data, name))
    work = os.path.join(out_dir, "textual_inversion")
    train(finetune_config(demo_dir, ti_data, "textual_inversion", steps, 16, 1e-2,
                          textual_inversion=dict(placeholder_token=f"<{WORD}>", initializer_token="red")),
          work, devices=devices)
    ti = StableDiffusionPipeline.from_pretrained(work)
    metrics["textual_inversion"] = rate(ti, [re.sub(rf"\b{WORD}\b", f"<{WORD}>", p) for p in prompts])
    metrics["timings_s"]["textual_inversion"] = time.time() - t


def _dreambooth(demo_dir, out_dir, cfg, classifier, base, steps, guidance, devices, n, attribute) -> dict:
    """One subject, the whole UNet, with and without the prior loss (``n`` class images): how the class
    prompt's ``n`` samples change. The subject: a large square in the centre whose ``attribute`` is purple
    (a purple square on white, or a red square on purple), "sks" naming that colour in its prompt; the
    class prompt: the same scene in the colour the model knows best for that attribute (red / white)."""
    from PIL import Image

    from ldm_jax.pipeline import StableDiffusionPipeline
    from ldm_jax.train.diffusion_task import train

    if attribute == "background":
        instance, shape_colour, background = f"a large red square in the center on a {WORD} background", "red", TARGET
        class_colour = "white"
    else:
        instance, shape_colour, background = f"a large {WORD} square in the center on a white background", TARGET, "white"
        class_colour = "red"
    # captions name the background (as every demo caption); the "class" is the nearest prompt the model knows
    klass = "a large red square in the center on a white background"
    subject = os.path.join(out_dir, f"subject_{attribute}")
    if not os.path.isdir(subject):  # five shots of one subject
        from ldm_jax.data.shapes import SIZE_FRACTIONS, render

        os.makedirs(subject)
        size, rng = cfg.data.image_size, np.random.default_rng(13)
        cell = size / 3
        for k in range(5):
            centre = np.array([[1.5 * cell, 1.5 * cell]]) + rng.uniform(-0.06, 0.06, (1, 2)) * cell
            radius = np.array([SIZE_FRACTIONS[1] * cell * cfg.data.shape_scale])
            image = render(size, [1], [COLORS.index(shape_colour)], centre, radius, COLORS.index(background))
            Image.fromarray(image).save(os.path.join(subject, f"{k}.png"))
    class_prompts = [klass] * n
    before = _samples(base, cfg, class_prompts, guidance)
    colour = lambda images, c: float(np.mean(classifier.predict(images)[attribute] == COLORS.index(c)))  # noqa: E731
    out = {"instance_prompt": instance, "class_prompt": klass, "attribute": attribute,
           "base_class_colour_rate": colour(before, class_colour), "base_class_target_rate": colour(before, TARGET)}
    for name, prior in (("prior", 1.0), ("no_prior", 0.0)):
        t = time.time()
        work = os.path.join(out_dir, f"dreambooth_{name}")
        db = dict(instance_prompt=instance, class_prompt=klass, num_class_images=n if prior else 0,
                  prior_loss_weight=prior, sample_steps=int(cfg.sample.steps), guidance=guidance, sample_batch=32)
        c = finetune_config(demo_dir, subject, "unet", steps, 16, 2e-4, source="dreambooth", dreambooth=db)
        train(c, work, devices=devices)
        pipe = StableDiffusionPipeline.from_pretrained(work)
        after = _samples(pipe, cfg, class_prompts, guidance)
        inst = _samples(pipe, cfg, [instance] * n, guidance)
        out[name] = {"class_colour_rate": colour(after, class_colour), "class_target_rate": colour(after, TARGET),
                     "class_mean_abs_change": float(np.abs(after.astype(np.float32) - before).mean() / 255),
                     "instance_target_rate": colour(inst, TARGET), "time_s": time.time() - t}
        from ldm_jax.pipeline import make_grid

        make_grid([Image.fromarray(x).resize((64, 64), Image.NEAREST) for x in np.concatenate([inst[:8], after[:8]])],
                  cols=8).save(os.path.join(out_dir, f"dreambooth_{name}.png"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="demo_out", help="the output folder of `ldm-jax demo`")
    p.add_argument("--out", default="finetune_out")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-images", type=int, default=48)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--parts", default="lora,textual_inversion,dreambooth")
    p.add_argument("--attribute", default="color", choices=("color", "background"),
                   help="what the new word names: the shape's colour or the background's")
    a = p.parse_args(argv)
    m = run_finetune(a.demo, a.out, num_images=a.num_images, num_prompts=a.num_prompts, steps=a.steps,
                     parts=tuple(a.parts.split(",")), attribute=a.attribute)
    print(json.dumps(m, indent=1))


if __name__ == "__main__":
    main()
