"""``ldm-jax demo --recipe faces``: the text-to-face recipe end to end on the cartoon-faces stand-in.

The path a CelebA-HQ user takes, at the size of a CPU (``tiny_text2face``, the twin of
``celebahq_text2face``), each stage through the library's public API and reused on a re-run:

1. the faces dataset in MM-CelebA-HQ's layout (``data/images``, ``data/text`` with ten captions an
   image, :func:`ldm_jax.data.faces.write_faces_dataset`) and a BERT WordPiece tokenizer of its words;
2. the KL f=4 autoencoder, trained by the autoencoder task into a workdir (the shapes demo's recipe);
3. latent diffusion with LDM's BERT text encoder trained jointly from scratch
   (``train.train_text_encoder``), the folder source drawing one caption an image each epoch, the
   frozen VAE read from the autoencoder's workdir (``init.vae``), into ``diffusion/``;
4. the face attribute reader (:mod:`.attributes`), then samples of ``prompt_for`` prompts of seen and
   held-out attribute combinations at each guidance scale from ``load_pipeline("diffusion")``: the
   attribute accuracy per split and guidance, against the bar of ``config.eval.targets``;
5. ``metrics.json``, sample grids and ``report.html``.
"""
from __future__ import annotations

import html
import json
import os
import re
import time

import jax
import numpy as np

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
RECIPE = "tiny_text2face"  # the networks, schedule and training defaults
SPLITS = (("train", "seen"), ("heldout", "heldout"))


def faces_demo_config(config_path: str | None = None, overrides=(), seed: int | None = None):
    """The demo's config (default the packaged one) with ``overrides``; ``seed`` sets the run's and
    the dataset's seed."""
    from ldm_jax.config_utils import load_config

    cfg = load_config(config_path or CONFIG, overrides)
    if seed is not None:
        cfg.seed = cfg.data.seed = int(seed)
    return cfg


def _recipe(cfg):
    """``tiny_text2face`` at the demo's image size."""
    from ldm_jax.config_utils import load_config

    r = load_config(RECIPE)
    r.stages = [dict(resolution=int(cfg.data.image_size), steps=int(cfg.diffusion.steps),
                     batch_size=int(cfg.diffusion.batch_size))]
    return r


def caption_words(data_dir: str) -> list[str]:
    """Every word of the dataset's captions and of the evaluation prompts (one token each)."""
    from ldm_jax.data import faces

    words: set[str] = set()
    for sub in ("text", os.path.join("heldout", "text")):
        folder = os.path.join(data_dir, sub)
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                words.update(re.findall(r"[a-z]+", f.read().lower()))
    for c in faces.ALL_COMBOS:
        words.update(re.findall(r"[a-z]+", faces.prompt_for(faces.attrs_from_combo(c)).lower()))
    return sorted(words)


def _tokenizer(out_dir: str, data_dir: str, length: int):
    from ldm_jax.models.tokenizer import PromptTokenizer
    from ldm_jax.tiny_tokenizer import write_tiny_bert_tokenizer

    path = write_tiny_bert_tokenizer(os.path.join(out_dir, "tokenizer"), words=caption_words(data_dir),
                                     model_max_length=length)
    return path, PromptTokenizer.from_pretrained(path)


def _train_autoencoder(cfg, recipe, out_dir: str, data_dir: str) -> str:
    """The autoencoder workdir the diffusion stage reads its VAE from (the decoder fine-tune's when it runs)."""
    from ml_collections import ConfigDict

    from ldm_jax.examples.shapes_demo.demo import _finished, autoencoder_train_config
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.train.autoencoder_task import train_autoencoder
    from ldm_jax.train.workdir import checkpoint_steps, load_autoencoder_workdir

    shapes_like = cfg.copy_and_resolve_references()
    shapes_like.vae = ConfigDict(dict(recipe.vae))
    model = AutoencoderKL(**dict(recipe.vae))
    runs = [("autoencoder", False)] + ([("autoencoder_decoder", True)] if int(cfg.autoencoder.decoder_steps) else [])
    params = None
    for name, decoder in runs:
        ae_cfg = autoencoder_train_config(shapes_like, out_dir, decoder=decoder)
        ae_cfg.data.update(source="folder", path=data_dir)
        work = os.path.join(out_dir, name)
        if os.path.isdir(work) and int(ae_cfg.train.num_steps) in checkpoint_steps(work):  # done before
            params = load_autoencoder_workdir(work)[1]
            continue
        state, history = _finished(train_autoencoder(ae_cfg, work, model, devices=jax.devices()[:1], params=params))
        params = jax.device_get(state.params["ae"])
        if history:
            print(f"[faces] {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in history[-1].items() if isinstance(v, float)))
    return work


def _train_images(data_dir: str, num: int) -> np.ndarray:
    from PIL import Image

    from ldm_jax.data import faces

    rows = faces.read_attributes(data_dir, "train")[:num]
    return np.stack([np.asarray(Image.open(os.path.join(data_dir, r["image"])).convert("RGB")) for r in rows])


def diffusion_train_config(cfg, out_dir: str, data_dir: str, tokenizer_dir: str, vocab: int, vae_workdir: str,
                           scaling_factor: float):
    """The diffusion stage: ``tiny_text2face`` with the demo's steps, the faces folder, the tokenizer,
    the autoencoder workdir as ``init.vae``."""
    from ldm_jax.examples.shapes_demo.demo import _decay_steps, compiler_options

    d = cfg.diffusion
    t = _recipe(cfg)
    t.tokenizer = tokenizer_dir
    t.text_encoder.vocab_size = int(vocab)
    t.init.vae, t.init.vae_scaling_factor = vae_workdir, float(scaling_factor)
    t.train.update(dict(seed=int(cfg.seed), lr=float(d.lr), warmup_steps=int(d.warmup_steps),
                        decay_steps=_decay_steps(d), min_snr_gamma=float(d.min_snr_gamma),
                        text_dropout=float(d.text_dropout), text_encoder_lr_scale=float(d.text_encoder_lr_scale),
                        compiler_options=compiler_options(d), log_every=25,
                        checkpoint_every=500, tensorboard=True))
    t.data.update(source="folder", path=data_dir, seed=int(cfg.seed) + 2)
    return t


def sample(pipe, cfg, prompts, guidance: float, seed: int, batch_size: int) -> np.ndarray:
    """uint8 ``[N, S, S, 3]``: one image per prompt, image ``i`` from seed ``seed + i``."""
    out = []
    size = int(cfg.data.image_size)
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        images = pipe(batch, num_inference_steps=int(cfg.sample.steps), guidance_scale=float(guidance),
                      sampler=cfg.sample.sampler, seed=[seed + i + j for j in range(len(batch))], height=size,
                      width=size, output_type="np")
        out.append(np.round(np.clip(np.asarray(images), 0.0, 1.0) * 255).astype(np.uint8))
    return np.concatenate(out)


def evaluate(pipe, reader, cfg, data_dir: str, out_dir: str) -> dict:
    """Attribute accuracy of one image per prompt (``prompt_for`` of the split's first ``num_prompts``
    faces, naming the hair and the present attributes as the captions do: seen = training combinations,
    held-out = combinations never trained on) per guidance; with ``eval.negated_prompts`` also of the
    same faces asked for with their absent attributes stated (at the highest guidance), a diagnostic."""
    from PIL import Image

    from ldm_jax.data import faces
    from ldm_jax.pipeline import make_grid

    e = cfg.eval
    acc: dict = {}
    negated: dict = {}
    prompts_out: dict = {}
    top = max(cfg.sample.guidance_scales)
    for split, name in SPLITS:
        rows = faces.read_attributes(data_dir, split)[: int(e.num_prompts)]
        attrs = [faces.normalize_attrs({k: r[k] for k in faces.ATTRIBUTE_NAMES}) for r in rows]
        prompts = [faces.prompt_for(a) for a in attrs]
        prompts_out[name] = prompts[: int(cfg.sample.num_prompts)]
        acc[name] = {}
        for g in cfg.sample.guidance_scales:
            images = sample(pipe, cfg, prompts, float(g), int(cfg.seed), int(e.batch_size))
            acc[name][str(g)] = {k: float(v) for k, v in reader.accuracy(images, attrs).items()}
            n = int(cfg.sample.num_prompts)
            make_grid([Image.fromarray(im).resize((64, 64)) for im in images[:n]], cols=n).save(
                os.path.join(out_dir, f"samples_{name}_g{g}.png"))
        if e.negated_prompts:  # the same faces asked for with every absent attribute stated ("no hat")
            images = sample(pipe, cfg, [faces.prompt_for(a, negations=True) for a in attrs], float(top),
                            int(cfg.seed), int(e.batch_size))
            negated[name] = {str(top): {k: float(v) for k, v in reader.accuracy(images, attrs).items()}}
    return {"attribute_accuracy": acc, "negated_prompts_accuracy": negated, "prompts": prompts_out,
            "bar": judge_bar(acc, cfg.sample.guidance_scales, e.targets, int(e.num_prompts))}


def judge_bar(acc: dict, guidance_scales, targets, num_prompts: int) -> dict:
    """At the best guidance >= 3 of each split, the mean attribute accuracy must reach
    ``targets[<split>_mean]`` and beat the lowest guidance's; ``failures`` says what missed."""
    high = [str(g) for g in guidance_scales if g >= 3.0]
    if not high:
        raise ValueError(f"the bar needs a guidance scale >= 3 in sample.guidance_scales, got {tuple(guidance_scales)}")
    low = str(min(guidance_scales))
    bar: dict = {"targets": dict(targets), "num_prompts": num_prompts, "failures": []}
    for name in ("seen", "heldout"):
        g = max(high, key=lambda k: acc[name][k]["mean"])
        mean, low_mean = acc[name][g]["mean"], acc[name][low]["mean"]
        bar[name] = {"guidance": float(g), "mean": mean, "mean_at_lowest_guidance": low_mean,
                     "stderr": float(np.sqrt(mean * (1 - mean) / num_prompts))}
        if not mean >= float(targets[f"{name}_mean"]):
            bar["failures"].append(f"{name} mean accuracy {mean:.3f} < {targets[f'{name}_mean']} at guidance {g}")
        if not mean > low_mean:
            bar["failures"].append(f"{name} mean accuracy at guidance {g} ({mean:.3f}) is not above guidance {low}'s "
                                   f"({low_mean:.3f})")
    bar["passed"] = not bar["failures"]
    return bar


def run_faces_demo(out_dir: str = "demo_faces_out", config_path: str | None = None, overrides=(),
                   rebuild: bool = False, seed: int | None = None) -> dict:
    """Run every stage (each reused from ``out_dir`` when done), write ``metrics.json`` and
    ``report.html``; returns the metrics."""
    import shutil

    from ldm_jax.data import faces
    from ldm_jax.examples.faces_demo.attributes import load_or_train_face_reader
    from ldm_jax.examples.shapes_demo.demo import _finished, _history, latent_scale
    from ldm_jax.pipeline import load_pipeline
    from ldm_jax.runtime import enable_compilation_cache
    from ldm_jax.train.diffusion_task import train
    from ldm_jax.train.workdir import load_autoencoder_workdir

    t_start = time.time()
    enable_compilation_cache()
    cfg = faces_demo_config(config_path, overrides, seed)
    if rebuild and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    stages: dict = {}
    d = cfg.data
    data_dir = os.path.join(out_dir, "data")
    recipe = _recipe(cfg)

    t = time.time()
    faces.write_faces_dataset(data_dir, image_size=int(d.image_size), num_train=int(d.num_train),
                              num_heldout=int(d.num_heldout), seed=int(d.seed),
                              captions_per_image=int(d.captions_per_image))
    tok_dir, tokenizer = _tokenizer(out_dir, data_dir, int(recipe.text_encoder.max_position_embeddings))
    stages["data_s"] = time.time() - t

    t = time.time()
    ae_work = _train_autoencoder(cfg, recipe, out_dir, data_dir)
    vae_cfg, vae_params, _ = load_autoencoder_workdir(ae_work)
    scale = latent_scale(vae_cfg, vae_params, _train_images(data_dir, 512).astype(np.float32) / 127.5 - 1.0)
    print(f"[faces] latent scaling_factor = {scale:.4f} (1/std of the latents)")
    stages["autoencoder_s"] = time.time() - t

    t = time.time()
    tcfg = diffusion_train_config(cfg, out_dir, data_dir, tok_dir, tokenizer.vocab_size, ae_work, scale)
    _, history = _finished(train(tcfg, os.path.join(out_dir, "diffusion"), devices=jax.devices()[:1]))
    history = _history(out_dir, "diffusion", history)
    stages["diffusion_s"] = time.time() - t

    t = time.time()
    e = cfg.eval
    reader = load_or_train_face_reader(os.path.join(out_dir, "face_reader"), image_size=int(d.image_size),
                                       seed=int(cfg.seed), num_images=int(e.reader_images), steps=int(e.reader_steps))
    stages["reader_s"] = time.time() - t

    t = time.time()
    pipe = load_pipeline(os.path.join(out_dir, "diffusion"))
    metrics: dict = {"seed": int(cfg.seed), "scaling_factor": scale, "reader_report": reader.report}
    metrics.update(evaluate(pipe, reader, cfg, data_dir, out_dir))
    stages["sampling_eval_s"] = time.time() - t
    metrics["stages"] = stages
    if history:
        metrics["diffusion_loss_first"], metrics["diffusion_loss_last"] = history[0]["loss"], history[-1]["loss"]
    metrics["wall_time_s"] = time.time() - t_start
    metrics["time_budget_s"] = float(cfg.time_budget_s)
    metrics["within_time_budget"] = bool(metrics["wall_time_s"] <= float(cfg.time_budget_s))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=1))
    _write_report(out_dir, cfg, metrics)
    bar = metrics["bar"]
    print(f"[faces] seen {bar['seen']['mean']:.3f} / held-out {bar['heldout']['mean']:.3f} mean attribute accuracy "
          f"(guidance {bar['seen']['guidance']:g} / {bar['heldout']['guidance']:g}); bar "
          f"{'passed' if bar['passed'] else 'MISSED: ' + '; '.join(bar['failures'])}; "
          f"{metrics['wall_time_s']:.0f} s -> {out_dir}/report.html")
    return metrics


def _write_report(out_dir: str, cfg, metrics: dict) -> None:
    rows = []
    for name, per_g in metrics["attribute_accuracy"].items():
        for g, vals in per_g.items():
            cells = "".join(f"<td>{v:.3f}</td>" for v in vals.values())
            rows.append(f"<tr><td>{name}</td><td>{g}</td>{cells}</tr>")
    head = "".join(f"<th>{html.escape(k)}</th>" for k in next(iter(next(iter(metrics["attribute_accuracy"].values()))
                                                                     .values())))
    body = [f"<table border=1><tr><th>split</th><th>guidance</th>{head}</tr>{''.join(rows)}</table>"]
    for name, prompts in metrics["prompts"].items():
        body.append(f"<h2>{name} prompts</h2><ol>" + "".join(f"<li>{html.escape(p)}</li>" for p in prompts) + "</ol>")
        for g in cfg.sample.guidance_scales:
            body.append(f"<p>guidance {g}</p><img src='samples_{name}_g{g}.png'>")
    stats = html.escape(json.dumps({k: v for k, v in metrics.items() if k != "prompts"}, indent=2))
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(f"<html><head><title>ldm_jax faces demo</title></head><body><h1>ldm_jax: text-to-face demo</h1>"
                f"<p>seed {metrics['seed']}; {metrics['wall_time_s']:.0f} s (budget {cfg.time_budget_s} s); bar passed: "
                f"{metrics['bar']['passed']}</p>{''.join(body)}<h2>All figures</h2><pre>{stats}</pre></body></html>")
