"""The end-to-end demo behind ``make demo``: a text-to-image model trained from nothing on CPU.

Built on the library's public API only (the one training loop with its diffusion and autoencoder
tasks, the data sources, the pipeline); the library never imports it.

Stages (each reused on a re-run unless ``rebuild``): build ``shapes_captions`` -> train the tiny KL
autoencoder on it -> pretrain the tiny CLIP text encoder on the training captions' labels (then
frozen) -> train the tiny text-conditioned latent diffusion model (10% text dropout) -> sample seen
and held-out prompts at several guidance scales -> ``demo_out/`` with ``metrics.json``, sample
grids, loss plots and ``report.html``.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
CONFIG_FILE = "config.json"  # the run's resolved config, in its output folder


def _train_source(cfg, out_dir):
    """The demo's ``shapes_captions`` training split (built under ``out_dir/data`` on first use)."""
    from ldm_jax.data import shapes_source

    d = cfg.data
    return shapes_source(os.path.join(out_dir, "data"), "train", image_size=d.image_size, num_train=d.num_train,
                         num_validation=d.num_validation, num_heldout=d.num_heldout, seed=d.seed,
                         **_scene_options(cfg))


def compiler_options(stage_cfg) -> dict:
    """A demo stage's XLA options: its ``ynn_fusions`` on the CPU (:func:`ldm_jax.runtime.ynn_options`);
    ``{}`` (XLA's defaults) for none or on another backend."""
    from ldm_jax.runtime import ynn_options

    return ynn_options(stage_cfg.ynn_fusions) or {}


def autoencoder_train_config(cfg, out_dir: str, decoder: bool = False):
    """The demo's autoencoder stage as a config of the autoencoder task (:mod:`ldm_jax.train.autoencoder_task`):
    the LDM objective without GAN and LPIPS (pixel loss + KL, at 32 px), on the demo's dataset.
    ``decoder``: the config of the decoder fine-tune that follows (``autoencoder.decoder_steps``): encoder
    frozen, clean latents."""
    from ml_collections import ConfigDict

    from ldm_jax.config_utils import load_config

    a, d = cfg.autoencoder, cfg.data
    ae_cfg = load_config("tiny_autoencoder")
    ae_cfg.vae = ConfigDict(dict(cfg.vae))
    ae_cfg.loss.perceptual_weight = 0.0
    ae_cfg.loss.pixel_loss = a.pixel_loss
    ae_cfg.loss.edge_weight = float(a.edge_weight)
    ae_cfg.loss.kl_weight = float(a.kl_weight)
    ae_cfg.loss.scale_equivariance_weight = float(a.scale_equivariance_weight)
    ae_cfg.loss.latent_noise = float(a.latent_noise)
    ae_cfg.loss.disc_start = 10 ** 9
    ae_cfg.optim.update(base_learning_rate=a.lr, scale_lr=False, b1=a.b1, b2=a.b2, decay_steps=_decay_steps(a))
    ae_cfg.train.update(num_steps=int(a.steps), batch_size=int(a.batch_size), seed=int(cfg.seed), log_every=20,
                        checkpoint_every=1000, keep_checkpoints=1, keep_every=0, preview_every=0,
                        compiler_options=compiler_options(a))
    ae_cfg.data.update(source="shapes", data_dir=os.path.join(out_dir, "data"), image_size=d.image_size,
                       num_train=d.num_train, num_validation=d.num_validation, num_heldout=d.num_heldout,
                       dataset_seed=d.seed, seed=cfg.seed + 1, random_crop=False, random_flip=False, num_threads=2,
                       **_scene_options(cfg))
    if decoder:
        ae_cfg.loss.latent_noise = 0.0
        ae_cfg.optim.frozen = ("encoder", "quant_conv")
        ae_cfg.optim.decay_steps = 0
        ae_cfg.train.num_steps = int(a.decoder_steps)
        ae_cfg.train.seed, ae_cfg.data.seed = int(cfg.seed) + 2, int(cfg.seed) + 3  # its own keys and data order
    return ae_cfg


def _train_autoencoder(cfg, out_dir, log):
    """The tiny KL autoencoder, trained with the library's resumable loop (checkpoints under
    ``out_dir/autoencoder``: an interrupted demo continues where it stopped)."""
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.train.autoencoder_task import train_autoencoder

    path = os.path.join(out_dir, "autoencoder.npz")
    if os.path.exists(path):
        return _load_params(path), _history(out_dir, "autoencoder")
    model = AutoencoderKL(**dict(cfg.vae))
    state, history = _finished(train_autoencoder(autoencoder_train_config(cfg, out_dir),
                                                 os.path.join(out_dir, "autoencoder"), model, devices=jax.devices()[:1]))
    params = jax.device_get(state.params["ae"])
    history = _history(out_dir, "autoencoder", history)
    if history:
        log("autoencoder", history[-1])
    if int(cfg.autoencoder.decoder_steps):
        state, dec_history = _finished(train_autoencoder(autoencoder_train_config(cfg, out_dir, decoder=True),
                                                         os.path.join(out_dir, "autoencoder_decoder"), model,
                                                         devices=jax.devices()[:1], params=params))
        params = jax.device_get(state.params["ae"])
        dec_history = _history(out_dir, "autoencoder_decoder", dec_history)
        if dec_history:
            log("autoencoder decoder fine-tune", dec_history[-1])
    _save_params(path, params)
    return params, history


def _finished(result):
    """A stage's training result; a stage stopped by SIGTERM / Ctrl-C (checkpoint saved) ends the demo
    with 128 + the signal instead of going on with a half-trained model. Rerunning resumes it."""
    if result.stopped_by is not None:
        print(f"[demo] stopped by signal {result.stopped_by} (checkpoint saved); rerun the same command to resume",
              flush=True)
        raise SystemExit(128 + int(result.stopped_by))
    return result


def _decay_steps(stage_cfg) -> int:
    """``lr_decay`` of a demo stage: "cosine" anneals the rate to 0 over the stage's ``steps``;
    "constant" (the default, LDM's recipe) keeps it."""
    kind = stage_cfg.lr_decay
    if kind not in ("constant", "cosine"):
        raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {kind!r}")
    if kind == "constant":
        return 0
    steps, warmup = int(stage_cfg.steps), int(stage_cfg.warmup_steps)
    if steps <= warmup:
        raise ValueError(f"lr_decay='cosine' needs steps ({steps}) > warmup_steps ({warmup})")
    return steps


def _save_params(path: str, params) -> None:
    from flax import traverse_util

    tmp = path + ".tmp.npz"  # written whole, then renamed: a crash never leaves a half file at `path`
    np.savez(tmp, **{"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()})
    os.replace(tmp, path)


def _load_params(path: str):
    from flax import traverse_util

    with np.load(path) as flat:
        return traverse_util.unflatten_dict({tuple(k.split("/")): flat[k] for k in flat.files})


def _pretrain_text_encoder(cfg, tokenizer, text_model, out_dir, log):
    """The frozen text encoder: random init, then (``cfg.text_pretrain.steps`` > 0) trained to read
    shape/colour/size/position/background from the *training* captions (the demo's stand-in for
    CLIP's pretraining, see :mod:`.text_pretrain`). Returns (params, probe metrics):
    a linear probe fitted on training captions, scored on held-out-combination captions."""
    from ldm_jax.examples.shapes_demo.attributes import labels_from_examples
    from ldm_jax.examples.shapes_demo.text_pretrain import pooled_features, pretrain_text_encoder, probe_accuracy

    length = int(cfg.text_encoder.max_position_embeddings)
    params = text_model.init(jax.random.key(cfg.seed + 3), jnp.zeros((1, length), jnp.int32))["params"]
    tp = cfg.text_pretrain
    if int(tp.steps) <= 0:
        return params, {}
    path = os.path.join(out_dir, "text_encoder.npz")
    train = _examples(cfg, "train", cfg.data.num_train)
    ids = np.asarray(tokenizer([ex["caption"] for ex in train]))
    labels = labels_from_examples(train)
    if os.path.exists(path):
        params, history = _load_params(path), _history(out_dir, "text_encoder")
    else:
        params, history = pretrain_text_encoder(text_model, params, ids, labels, steps=int(tp.steps),
                                                batch_size=int(tp.batch_size), lr=float(tp.lr), seed=cfg.seed + 4)
        _save_params(path, params)
        _history(out_dir, "text_encoder", history)
    heldout = _examples(cfg, "heldout", cfg.data.num_heldout)
    probe = probe_accuracy(pooled_features(text_model, params, ids), labels,
                           pooled_features(text_model, params, np.asarray(tokenizer([ex["caption"] for ex in heldout]))),
                           labels_from_examples(heldout))
    log("text encoder (held-out caption probe)", probe)
    return params, {"heldout_probe_accuracy": probe, "final": history[-1] if history else {}}


def diffusion_train_config(cfg, tokenizer, out_dir: str):
    """The diffusion task's config (:mod:`ldm_jax.train.diffusion_task`) for the demo's diffusion stage:
    the demo's networks and scheduler (whose ``prediction_type`` the UNet is trained to predict), on
    the demo's ``shapes_captions`` (or its cached latents, see :func:`_cache_latents`)."""
    from ml_collections import ConfigDict

    from ldm_jax.config_utils import load_config

    d, data = cfg.diffusion, cfg.data
    tcfg = load_config("tiny_train")
    for key in ("unet", "vae", "text_encoder", "scheduler"):
        tcfg[key] = ConfigDict(dict(cfg[key]))
    tcfg.train.prediction_type = cfg.scheduler.prediction_type
    tcfg.stages = [dict(resolution=data.image_size, steps=d.steps, batch_size=d.batch_size)]
    tcfg.train.update(dict(lr=d.lr, warmup_steps=d.warmup_steps, preview_every=0, tensorboard=True,
                           checkpoint_every=500, log_every=25))
    tcfg.train.min_snr_gamma = float(d.min_snr_gamma)
    tcfg.train.decay_steps = _decay_steps(d)
    tcfg.train.compiler_options = compiler_options(d)
    tcfg.train.text_dropout = float(d.text_dropout)
    tcfg.tokenizer = os.path.join(out_dir, "tokenizer")  # so `ldm-jax sample --model out_dir/diffusion` works
    tcfg.train.empty_prompt_ids = [int(x) for x in tokenizer([""])[0]]
    tcfg.data.update(source="shapes", data_dir=os.path.join(out_dir, "data"), num_train=data.num_train,
                     num_validation=data.num_validation, num_heldout=data.num_heldout, dataset_seed=data.seed,
                     seed=cfg.seed + 2, random_flip=False, num_threads=2, max_shapes=data.max_shapes,
                     shape_scale=data.shape_scale)
    return tcfg


def _fingerprint(*trees) -> str:
    import hashlib

    h = hashlib.sha1()
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def _cache_latents(cfg, tokenizer, vae_params, text_params, out_dir) -> str:
    """Encode the training split once with the frozen encoders (:mod:`ldm_jax.data.latents`: VAE
    posterior moments, text context); returns the directory for ``data.cached_latents``. Reused
    while the autoencoder and text encoder are the ones it was encoded with, redone otherwise."""
    from ml_collections import ConfigDict

    from ldm_jax.convert import LoadedModel
    from ldm_jax.data.latents import ModelEncoder, encode_dataset

    path = os.path.join(out_dir, "latents")
    d = cfg.data
    loaded = LoadedModel(config=ConfigDict({"vae": dict(cfg.vae), "text_encoder": dict(cfg.text_encoder)}),
                         params={"vae": vae_params, "text_encoder": text_params}, source="demo")
    encoder = ModelEncoder(loaded, tokenizer=tokenizer, devices=jax.local_devices()[:1])
    info = dict(encoder.info, encoders=_fingerprint(vae_params, text_params))

    def stale(name):  # a finished or interrupted encoding by other encoders
        f = os.path.join(path, name)
        if not os.path.exists(f):
            return False
        with open(f) as fh:
            return json.load(fh)["signature"]["info"] != json.loads(json.dumps(info))

    encode_dataset(_train_source(cfg, out_dir), encoder, path, image_size=d.image_size, batch_size=128, info=info,
                   overwrite=stale("metadata-00000.json") or stale("progress-00000.json"),
                   progress=True, num_threads=2)
    return path


def _train_diffusion(cfg, tokenizer, vae_params, text_params, out_dir, log):
    from ldm_jax.train.diffusion_task import train

    tcfg = diffusion_train_config(cfg, tokenizer, out_dir)
    if cfg.diffusion.cached_latents:
        tcfg.data.cached_latents = _cache_latents(cfg, tokenizer, vae_params, text_params, out_dir)
    state, history = _finished(train(tcfg, os.path.join(out_dir, "diffusion"),
                                     frozen={"text": text_params, "vae": vae_params}, devices=jax.devices()[:1]))
    if history:
        log("diffusion", history[-1])
    return jax.device_get(state.ema_params), _history(out_dir, "diffusion", history)


def _scene_options(cfg) -> dict:
    """The ``make_example`` options the demo's config sets (``max_shapes``, ``shape_scale``)."""
    return {k: cfg.data[k] for k in ("max_shapes", "shape_scale") if k in cfg.data}


def _examples(cfg, split: str, num: int, start: int = 0) -> list[dict]:
    """``make_example`` scenes of the demo's dataset (same seed/size/max_shapes as training)."""
    from ldm_jax.data.shapes import make_example

    d = cfg.data
    extra = _scene_options(cfg)
    return [make_example(d.seed, split, start + i, d.image_size, **extra) for i in range(num)]


def caption_words(cfg, num: int = 3000) -> list[str]:
    """Every word the demo's captions use (train and held-out templates), for a word-level vocab.

    With the tiny byte-level BPE most caption words split into several tokens; a frozen random
    text encoder then hardly separates "red" from "green". One token per word keeps them apart.
    """
    import re

    words = set()
    for split in ("train", "heldout"):
        for ex in _examples(cfg, split, num):
            words.update(re.findall(r"[a-z]+", ex["caption"].lower()))
    return sorted(words)


def demo_tokenizer(cfg, out_dir: str, num_captions: int = 3000):
    """The demo's tokenizer, written to ``out_dir/tokenizer``: one token per caption word
    (``cfg.word_vocab``, see :func:`caption_words` over ``num_captions`` per split), padded and
    truncated to the text encoder's ``max_position_embeddings``."""
    from ldm_jax.models.tokenizer import PromptTokenizer
    from ldm_jax.tiny_tokenizer import write_tiny_clip_tokenizer

    words = caption_words(cfg, num_captions) if cfg.word_vocab else None
    length = int(cfg.text_encoder.max_position_embeddings)
    return PromptTokenizer.from_pretrained(write_tiny_clip_tokenizer(os.path.join(out_dir, "tokenizer"), words=words,
                                                                     model_max_length=length))


def _latent_means(vae_config, vae_params, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The encoder's posterior means of ``images`` [N,H,W,3] in [-1,1], ``batch_size`` at a time."""
    from ldm_jax.models.autoencoder import AutoencoderKL

    model = AutoencoderKL(**dict(vae_config))
    encode = jax.jit(lambda x: model.apply({"params": vae_params}, x, method=model.encode).mean)
    return np.concatenate([np.asarray(encode(jnp.asarray(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])


def latent_scale(vae_config, vae_params, images: np.ndarray, batch_size: int = 128) -> float:
    """SD's ``scaling_factor``: 1 / std of the encoder's posterior means over ``images`` [N,H,W,3] in [-1,1]."""
    return float(1.0 / _latent_means(vae_config, vae_params, images, batch_size).std())


def latent_shape_split(cfg, vae_params, batch_size: int = 128) -> dict:
    """How the autoencoder's latents hold the shape: a two-way analysis of variance of the posterior
    means of one centred shape in every (shape, colour) pair, for each background and size.

    Returns the shares of the latents' variance due to the shape alone (``shape``), the colour alone
    (``color``) and their interaction (``interaction``: what a shape looks like differently in each
    colour), averaged over the backgrounds and sizes. The diffusion stage learns shapes when the
    shape is a large and additive part of the latents: the runs that reached the bar's shape figures
    read shape >= 0.37 and interaction <= 0.05, those that missed them on seen prompts shape <= 0.21
    (docs/demo.md); the round trip does not show it. It ranks the autoencoders of one recipe: those
    trained on noisy latents (``latent_noise``) read 0.28-0.34 and ran alike. A ratio of variances:
    SD's ``scaling_factor`` does not change it."""
    from ldm_jax.data.shapes import COLORS, SHAPES, SIZE_FRACTIONS, render

    size = cfg.data.image_size
    cell = size / 3.0
    groups = []
    for background in range(len(COLORS)):
        colors = [c for c in range(len(COLORS)) if c != background]
        for frac in SIZE_FRACTIONS:
            radius = frac * cfg.data.shape_scale * cell
            groups.append(np.stack([render(size, [s], [c], [(1.5 * cell, 1.5 * cell)], [radius], background)
                                    for s in range(len(SHAPES)) for c in colors]))
    z = _latent_means(cfg.vae, vae_params, np.concatenate(groups).astype(np.float32) / 127.5 - 1.0, batch_size)
    z = z.reshape(len(groups), len(SHAPES), len(COLORS) - 1, -1).astype(np.float64)
    grand = z.mean((1, 2), keepdims=True)
    shape_effect = z.mean(2, keepdims=True) - grand
    color_effect = z.mean(1, keepdims=True) - grand
    total = ((z - grand) ** 2).sum((1, 2, 3))
    shares = {
        "shape": (shape_effect ** 2).sum((1, 2, 3)) * (len(COLORS) - 1) / total,
        "color": (color_effect ** 2).sum((1, 2, 3)) * len(SHAPES) / total,
        "interaction": ((z - grand - shape_effect - color_effect) ** 2).sum((1, 2, 3)) / total,
    }
    return {k: float(v.mean()) for k, v in shares.items()}


def autoencoder_ceiling(classifier, cfg, vae_params, num: int = 256, batch_size: int = 64) -> dict:
    """Attribute accuracy of real validation images after an autoencoder round trip (posterior mean).

    The diffusion model can only produce what the decoder can draw, so this bounds what the
    generated images can reach; a low figure points at the autoencoder, not the diffusion stage.
    """
    from ldm_jax.examples.shapes_demo.attributes import attribute_accuracy, labels_from_examples
    from ldm_jax.models.autoencoder import AutoencoderKL

    model = AutoencoderKL(**dict(cfg.vae))
    roundtrip = jax.jit(lambda x: model.apply({"params": vae_params}, x,
                                              method=lambda m, x: m.decode(m.encode(x).mean)))
    examples = _examples(cfg, "validation", num)
    x = np.stack([ex["image"] for ex in examples]).astype(np.float32) / 127.5 - 1.0
    rec = np.concatenate([np.asarray(roundtrip(jnp.asarray(x[i:i + batch_size]))) for i in range(0, num, batch_size)])
    rec = np.clip(np.round((rec + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return {k: float(v) for k, v in attribute_accuracy(classifier.predict(rec), labels_from_examples(examples)).items()}


def classifier_real_accuracy(classifier, cfg, num: int = 256) -> dict:
    """Attribute accuracy of the classifier on real validation images: how well the instrument
    reads what the generated images are compared against (the other ceiling of every figure)."""
    from ldm_jax.examples.shapes_demo.attributes import attribute_accuracy, labels_from_examples

    examples = _examples(cfg, "validation", num)
    real = np.stack([ex["image"] for ex in examples])
    return {k: float(v) for k, v in attribute_accuracy(classifier.predict(real), labels_from_examples(examples)).items()}


def sample_images(pipe, cfg, prompts, guidance: float, seed: int, batch_size: int) -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` samples of ``prompts`` with the demo's sampler settings, ``batch_size`` at a
    time (batch ``i`` seeded ``seed + i``)."""
    images = []
    for i in range(0, len(prompts), batch_size):
        out = pipe(prompts[i:i + batch_size], num_inference_steps=cfg.sample.steps, guidance_scale=guidance,
                   sampler=cfg.sample.sampler, seed=seed + i, height=cfg.data.image_size,
                   width=cfg.data.image_size, output_type="np")
        images.append(np.round(np.clip(np.asarray(out), 0.0, 1.0) * 255).astype(np.uint8))
    return np.concatenate(images)


def evaluate(pipe, classifier, cfg, out_dir: str) -> dict:
    """Attribute accuracy and classifier-space FID of generated images per split and guidance.

    For each split (``train``: captions the model was trained on; ``heldout``: unseen (shape,
    colour) pairs) and each guidance scale, one image per caption; the classifier (trained on real
    images) reads its attributes, compared with the caption's labels. Also writes sample grids.
    """
    from ldm_jax.eval.fid import fid_from_features
    from ldm_jax.examples.shapes_demo.attributes import attribute_accuracy, labels_from_examples
    from ldm_jax.pipeline import make_grid

    e = cfg.eval
    results: dict = {"attribute_accuracy": {}, "fid_classifier": {}, "prompts": {}}
    for split in ("train", "heldout"):
        examples = _examples(cfg, split, e.num_prompts)
        captions = [ex["caption"] for ex in examples]
        labels = labels_from_examples(examples)
        real = np.stack([ex["image"] for ex in examples])
        real_feats = classifier.features(real)
        results["prompts"][split] = captions[:cfg.sample.num_prompts]
        results["attribute_accuracy"][split], results["fid_classifier"][split] = {}, {}
        for g in cfg.sample.guidance_scales:
            images = sample_images(pipe, cfg, captions, float(g), cfg.seed, e.batch_size)
            acc = attribute_accuracy(classifier.predict(images), labels)
            results["attribute_accuracy"][split][str(g)] = {k: float(v) for k, v in acc.items()}
            results["fid_classifier"][split][str(g)] = float(fid_from_features(classifier.features(images), real_feats))
            n = cfg.sample.num_prompts
            make_grid([_pil(im).resize((64, 64)) for im in images[:n]], cols=n).save(
                os.path.join(out_dir, f"samples_{split}_g{g}.png"))
        _pil_grid_real(real[:cfg.sample.num_prompts], os.path.join(out_dir, f"real_{split}.png"))
    results["bar"] = judge_bar(results["attribute_accuracy"], cfg.sample.guidance_scales, cfg.eval.targets,
                               num_prompts=e.num_prompts)
    return results


ATTRIBUTES = ("color", "shape", "position")


def judge_bar(acc: dict, guidance_scales, targets, num_prompts: int) -> dict:
    """The demo's bar on the attribute accuracies ``acc[split][str(guidance)]`` (splits ``train``, the
    seen prompts, and ``heldout``): at the best guidance >= 3 of each split, the mean accuracy and the
    *worst* attribute's must reach ``targets`` (``seen_mean``, ``seen_worst``, ``heldout_mean``,
    ``heldout_worst``), and the mean must beat the lowest guidance's; a model that draws the right
    colour at the right place but no recognisable shape fails on its worst attribute. ``failures``
    says what missed; each figure's standard error over ``num_prompts`` prompts is given with it."""
    high = [str(g) for g in guidance_scales if g >= 3.0]
    if not high:
        raise ValueError(f"the bar needs a guidance scale >= 3 in sample.guidance_scales, got {tuple(guidance_scales)}")
    low = str(min(guidance_scales))
    bar: dict = {"targets": dict(targets), "num_prompts": int(num_prompts), "failures": []}
    for split, name in (("train", "seen"), ("heldout", "heldout")):
        g = max(high, key=lambda k: acc[split][k]["mean"])
        a = acc[split][g]
        worst = min(ATTRIBUTES, key=lambda k: a[k])
        bar[name] = {"guidance": float(g), "mean": a["mean"], "worst_attribute": worst, "worst": a[worst],
                     "mean_at_lowest_guidance": acc[split][low]["mean"],
                     "stderr_worst": float(np.sqrt(a[worst] * (1 - a[worst]) / num_prompts)),
                     **{k: a[k] for k in ATTRIBUTES}}
        for what, value in (("mean", a["mean"]), ("worst", a[worst])):
            target = float(targets[f"{name}_{what}"])
            if not value >= target:
                label = f"{name} {what} accuracy" + (f" ({worst})" if what == "worst" else "")
                bar["failures"].append(f"{label} {value:.3f} < {target} at guidance {g}")
        if not a["mean"] > acc[split][low]["mean"]:
            bar["failures"].append(f"{name} mean accuracy at guidance {g} ({a['mean']:.3f}) is not above guidance "
                                   f"{low}'s ({acc[split][low]['mean']:.3f})")
    bar["passed"] = not bar["failures"]
    return bar


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image)


def _pil_grid_real(images: np.ndarray, path: str) -> None:
    from ldm_jax.pipeline import make_grid

    make_grid([_pil(im).resize((64, 64)) for im in images], cols=len(images)).save(path)


def _classifier(cfg, out_dir: str):
    """The attribute classifier (trained once on real images, then loaded)."""
    from ldm_jax.examples.shapes_demo.attributes import AttributeClassifier, train_attribute_classifier

    path = os.path.join(out_dir, "attribute_classifier")
    if os.path.exists(path + ".npz") or os.path.isdir(path):
        try:
            return AttributeClassifier.load(path)
        except Exception as err:  # a half-written file from a crash: retrain
            print(f"[demo] retraining the attribute classifier ({err})")
    c = cfg.eval
    clf = train_attribute_classifier(cfg.data.image_size, seed=cfg.seed, num_images=c.classifier_images,
                                     steps=c.classifier_steps, batch_size=c.classifier_batch_size,
                                     compiler_options=compiler_options(c) or None,
                                     **_scene_options(cfg))
    clf.save(path)
    return clf


def _history(out_dir, name, history=None):
    """Save a stage's logged metrics, or (``history`` empty: the stage was reused) load them."""
    path = os.path.join(out_dir, f"{name}_history.json")
    if history:
        with open(path, "w") as f:
            json.dump(history, f)
        return history
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return []


def _plot_losses(histories, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5))
    for ax, (name, hist, key) in zip(np.atleast_1d(axes), histories):
        steps = [h["step"] for h in hist if key in h]
        ax.plot(steps, [h[key] for h in hist if key in h])
        ax.set_title(f"{name}: {key}")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_demo_config(out_dir: str):
    """The config a finished demo run in ``out_dir`` used (its ``config.json``)."""
    import ml_collections

    path = os.path.join(out_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{out_dir} holds no finished demo run (no {CONFIG_FILE}): run `ldm-jax demo --out "
                                f"{out_dir}` first")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def demo_config(config_path: str | None = None, overrides=(), seed: int | None = None):
    """The demo's config (default: the packaged recipe) with ``overrides``; ``seed`` sets the run's
    seed and the dataset's, from which every other seed of the run is derived."""
    from ldm_jax.config_utils import load_config

    cfg = load_config(config_path or CONFIG, overrides)
    if seed is not None:
        cfg.seed = cfg.data.seed = int(seed)
    return cfg


def run_demo(out_dir: str = "demo_out", config_path: str | None = None, overrides=(), rebuild: bool = False,
             seed: int | None = None) -> dict:
    """Run every stage, write ``out_dir/metrics.json`` and ``report.html``; returns the metrics.
    ``seed`` (default: the config's) seeds everything: the dataset, every initialisation, the data
    order, the text dropout and the sampling noise."""
    import shutil

    from ldm_jax.models.clip_text import CLIPTextModel
    from ldm_jax.pipeline import StableDiffusionPipeline
    from ldm_jax.runtime import enable_compilation_cache

    t_start = time.time()
    enable_compilation_cache()  # a re-run (stages reused) skips the compiles too
    cfg = demo_config(config_path, overrides, seed)
    print(f"[demo] seed {cfg.seed} (dataset seed {cfg.data.seed})")
    if rebuild and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _check_seed(out_dir, int(cfg.seed))
    stages: dict = {}

    def log(name, metrics):
        print(f"[demo] {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))

    tokenizer = demo_tokenizer(cfg, out_dir)
    latent = int(cfg.vae.latent_channels)  # the UNet denoises the autoencoder's latents
    cfg.unet.update(in_channels=latent, out_channels=latent)
    cfg.text_encoder.update(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    t = time.time()
    _train_source(cfg, out_dir)  # builds the dataset on first use
    stages["data_s"] = time.time() - t

    t = time.time()
    trained_now = not os.path.exists(os.path.join(out_dir, "autoencoder.npz"))
    vae_params, ae_hist = _train_autoencoder(cfg, out_dir, log)
    stages["autoencoder_s"] = time.time() - t
    if trained_now:  # a reused autoencoder says nothing about this machine's speed
        _warn_if_over_budget(cfg, time.time() - t_start, ae_hist)
    if cfg.auto_scaling_factor:
        real = np.stack([ex["image"] for ex in _examples(cfg, "train", min(512, cfg.data.num_train))])
        cfg.vae.scaling_factor = latent_scale(cfg.vae, vae_params, real.astype(np.float32) / 127.5 - 1.0)
        print(f"[demo] latent scaling_factor = {cfg.vae.scaling_factor:.4f} (1/std of the latents)")
    shape_split = latent_shape_split(cfg, vae_params)
    print("[demo] latents' variance (one centred shape, every shape and colour): shape {shape:.3f}, colour "
          "{color:.3f}, interaction {interaction:.3f} (the shape's share; docs/demo.md relates it to the runs' figures)"
          .format(**shape_split))

    t = time.time()
    text_params, text_metrics = _pretrain_text_encoder(cfg, tokenizer, CLIPTextModel(**dict(cfg.text_encoder)),
                                                       out_dir, log)
    stages["text_encoder_s"] = time.time() - t
    t = time.time()
    unet_params, diff_hist = _train_diffusion(cfg, tokenizer, vae_params, text_params, out_dir, log)
    stages["diffusion_s"] = time.time() - t

    t = time.time()
    classifier = _classifier(cfg, out_dir)
    stages["classifier_s"] = time.time() - t

    pipe = StableDiffusionPipeline(cfg, {"unet": unet_params, "vae": vae_params, "text_encoder": text_params},
                                   tokenizer)
    metrics: dict = {"seed": int(cfg.seed), "stages": stages, "scaling_factor": float(cfg.vae.scaling_factor),
                     "latent_shape_split": shape_split, "text_encoder": text_metrics}
    t = time.time()
    metrics["classifier_real_accuracy"] = classifier_real_accuracy(classifier, cfg, num=min(256, cfg.data.num_validation))
    log("attribute classifier on real validation images", metrics["classifier_real_accuracy"])
    metrics["autoencoder_roundtrip_accuracy"] = autoencoder_ceiling(classifier, cfg, vae_params,
                                                                    num=min(256, cfg.data.num_validation))
    log("autoencoder round trip (attribute accuracy)", metrics["autoencoder_roundtrip_accuracy"])
    results = evaluate(pipe, classifier, cfg, out_dir)
    metrics["samples"] = results.pop("prompts")
    metrics.update(results)
    stages["sampling_eval_s"] = time.time() - t

    ae_key = next((k for k in ("rec_loss", "nll_loss", "loss") if ae_hist and k in ae_hist[-1]), None)
    plots = [("diffusion", diff_hist, "loss")] + ([("autoencoder", ae_hist, ae_key)] if ae_key else [])
    _plot_losses(plots, os.path.join(out_dir, "losses.png"))
    if diff_hist:
        metrics["diffusion_loss_first"] = diff_hist[0]["loss"]
        metrics["diffusion_loss_last"] = diff_hist[-1]["loss"]
    if ae_key:
        metrics["autoencoder_loss_first"], metrics["autoencoder_loss_last"] = ae_hist[0][ae_key], ae_hist[-1][ae_key]
    metrics["steps_per_s"] = {name: _steps_per_s(hist, batch) for name, hist, batch in (
        ("autoencoder", ae_hist, cfg.autoencoder.batch_size), ("diffusion", diff_hist, cfg.diffusion.batch_size))}
    metrics["wall_time_s"] = time.time() - t_start
    metrics["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")  # huge-page malloc: see ldm_jax.runtime
    budget = cfg.time_budget_s
    if budget:
        metrics["time_budget_s"] = float(budget)
        metrics["within_time_budget"] = bool(metrics["wall_time_s"] <= budget)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:  # what later steps (fine-tuning) read the run as
        f.write(cfg.to_json_best_effort(indent=1))
    _write_report(out_dir, cfg, metrics)
    print(f"[demo] done in {metrics['wall_time_s']:.0f} s -> {out_dir}/report.html")
    return metrics


def _check_seed(out_dir: str, seed: int) -> None:
    """Stages are reused from ``out_dir``: only when they were built with the same seed."""
    path = os.path.join(out_dir, "seed.json")
    if os.path.exists(path):
        with open(path) as f:
            built = json.load(f)["seed"]
        if built != seed:
            raise ValueError(f"{out_dir} holds a demo built with seed {built}, not {seed}: "
                             f"pass --rebuild or another --out")
        return
    with open(path, "w") as f:
        json.dump({"seed": seed}, f)


def _steps_per_s(history, batch_size) -> float | None:
    """The median training rate of a stage's logged intervals (compiles excluded), steps per second."""
    rates = [h["images_per_s"] / batch_size for h in history[1:] if h.get("images_per_s")]
    return float(np.median(rates)) if rates else None


def _warn_if_over_budget(cfg, elapsed: float, ae_history) -> None:
    """After the autoencoder stage: scale the rest of the run by how fast this machine trained the
    autoencoder against the reference machine (``cfg.time_reference``) and say at once when the
    projected total is over ``cfg.time_budget_s``."""
    ref, budget = cfg.time_reference, float(cfg.time_budget_s)
    rate = _steps_per_s(ae_history, cfg.autoencoder.batch_size)
    if not rate or not budget or not ref.autoencoder_steps_per_s:
        return
    slowness = float(ref.autoencoder_steps_per_s) / rate
    projected = elapsed + slowness * float(ref.after_autoencoder_s)
    msg = (f"[demo] autoencoder at {rate:.1f} steps/s ({slowness:.2f}x the reference machine's time): "
           f"projected total {projected:.0f} s for a budget of {budget:.0f} s")
    if projected > budget:
        msg += f": OVER BUDGET by ~{projected - budget:.0f} s on this machine"
    print(msg, flush=True)


def _write_report(out_dir, cfg, metrics):
    import html

    rows = []
    acc = metrics.get("attribute_accuracy", {})
    if acc:
        head = "".join(f"<th>{html.escape(k)}</th>" for k in next(iter(next(iter(acc.values())).values())))
        table = [f"<tr><th>split</th><th>guidance</th>{head}<th>FID (classifier)</th></tr>"]
        for split, per_g in acc.items():
            for g, vals in per_g.items():
                cells = "".join(f"<td>{v:.3f}</td>" for v in vals.values())
                fid = metrics["fid_classifier"][split][g]
                table.append(f"<tr><td>{split}</td><td>{g}</td>{cells}<td>{fid:.2f}</td></tr>")
        keys = list(next(iter(next(iter(acc.values())).values())))
        for name, key in (("real images (the classifier)", "classifier_real_accuracy"),
                          ("autoencoder round trip", "autoencoder_roundtrip_accuracy")):
            if key in metrics:  # the ceilings: validation images, read directly and after encode/decode
                cells = "".join(f"<td>{metrics[key][k]:.3f}</td>" if k in metrics[key] else "<td></td>" for k in keys)
                table.append(f"<tr><td>{name}</td><td></td>{cells}<td></td></tr>")
        bar = metrics.get("bar", {})
        misses = "".join(f"<li>{html.escape(f)}</li>" for f in bar.get("failures", []))
        rows.append(f"<h2>Attribute accuracy (bar passed: {bar.get('passed')})</h2><table border=1>"
                    + "".join(table) + "</table>" + (f"<p>missed:</p><ul>{misses}</ul>" if misses else ""))
    for split, prompts in metrics["samples"].items():
        rows.append(f"<h2>{split} prompts</h2><ol>" + "".join(f"<li>{html.escape(p)}</li>" for p in prompts) + "</ol>")
        if os.path.exists(os.path.join(out_dir, f"real_{split}.png")):
            rows.append(f"<p>real images for these captions</p><img src='real_{split}.png'>")
        for g in cfg.sample.guidance_scales:
            rows.append(f"<p>guidance {g}</p><img src='samples_{split}_g{g}.png'>")
    body = "\n".join(rows)
    stats = html.escape(json.dumps({k: v for k, v in metrics.items() if k != "samples"}, indent=2))
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        rates = ", ".join(f"{k} {v:.1f} steps/s" for k, v in metrics.get("steps_per_s", {}).items() if v)
        f.write(f"<html><head><title>ldm_jax demo</title></head><body><h1>ldm_jax demo</h1>"
                f"<p>seed {metrics.get('seed')}; {metrics.get('wall_time_s', 0):.0f} s (budget {cfg.time_budget_s} s); "
                f"{html.escape(rates)}</p>{body}<img src='losses.png'><h2>All figures</h2><pre>{stats}</pre></body></html>")
