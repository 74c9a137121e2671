"""The end-to-end demo runs (tiny settings) and writes every artefact; a re-run reuses its outputs, and so
does the training notebook, which shows them."""
import json
import os

import numpy as np
import pytest

# 16 px scenes (4x4 latents) and enough steps for a model whose samples follow the background word of
# their prompt (read at guidance 3: ~0.9 of held-out prompts): the base of the fine-tuning test below.
OVERRIDES = ["--config.data.image_size=16", "--config.vae.sample_size=16", "--config.unet.sample_size=4",
             "--config.autoencoder.steps=400", "--config.autoencoder.decoder_steps=20",
             "--config.text_pretrain.steps=300", "--config.diffusion.steps=400", "--config.diffusion.warmup_steps=20",
             "--config.data.num_train=512", "--config.data.num_validation=16", "--config.data.num_heldout=16",
             "--config.sample.steps=8", "--config.sample.num_prompts=2", "--config.eval.num_prompts=4",
             "--config.eval.batch_size=4", "--config.eval.classifier_images=512", "--config.eval.classifier_steps=300"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo at tiny settings: (output folder, metrics)."""
    from ldm_jax.examples.shapes_demo import run_demo

    out = str(tmp_path_factory.mktemp("demo") / "out")
    return out, run_demo(out, overrides=OVERRIDES)


def test_demo_end_to_end_tiny(demo):
    from ldm_jax.examples.shapes_demo import run_demo

    out, metrics = demo
    overrides = OVERRIDES
    for name in ("metrics.json", "report.html", "losses.png", "samples_train_g1.0.png", "samples_heldout_g3.0.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["wall_time_s"] > 0 and set(saved["samples"]) == {"train", "heldout"}
    assert saved["time_budget_s"] == 1200 and saved["within_time_budget"] == (saved["wall_time_s"] <= 1200)
    for split in ("train", "heldout"):
        assert set(saved["attribute_accuracy"][split]) == {"1.0", "3.0"}  # the config's guidance scales
        for g in ("1.0", "3.0"):
            acc = saved["attribute_accuracy"][split][g]
            assert {"color", "shape", "position", "mean", "all"} <= set(acc) and 0.0 <= acc["mean"] <= 1.0
            assert saved["fid_classifier"][split][g] >= 0.0
    assert set(saved["bar"]) >= {"passed", "failures", "seen", "heldout", "targets"} and saved["seed"] == 0
    assert saved["bar"]["passed"] == (not saved["bar"]["failures"])
    assert set(saved["steps_per_s"]) == {"autoencoder", "diffusion"}
    assert 0.1 < saved["scaling_factor"] < 100
    assert metrics["diffusion_loss_last"] < metrics["diffusion_loss_first"]
    assert 0.0 <= saved["autoencoder_roundtrip_accuracy"]["mean"] <= 1.0
    assert set(saved["latent_shape_split"]) == {"shape", "color", "interaction"}
    assert {"color", "shape", "position", "mean"} <= set(saved["classifier_real_accuracy"])
    assert os.path.isdir(os.path.join(out, "autoencoder", "checkpoints"))  # the AE stage resumes after a crash
    assert os.path.isdir(os.path.join(out, "autoencoder_decoder", "checkpoints"))  # and so does its decoder fine-tune
    probe = saved["text_encoder"]["heldout_probe_accuracy"]  # the pretrained frozen text encoder
    assert {"color", "shape", "position", "mean"} <= set(probe) and os.path.isfile(os.path.join(out, "text_encoder.npz"))
    # the tokenizer pads to the text encoder's positions (the config's, not CLIP's 77)
    from ldm_jax.models.tokenizer import PromptTokenizer

    tokenizer = PromptTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    assert np.asarray(tokenizer(["a red circle"])).shape == (1, 32)
    from ldm_jax.examples.shapes_demo.demo import load_demo_config

    cfg = load_demo_config(out)  # the run's own config, as the fine-tuning experiment reads it
    assert cfg.data.image_size == 16 and cfg.diffusion.steps == 400 and cfg.seed == saved["seed"]
    with pytest.raises(FileNotFoundError, match="no finished demo run"):
        load_demo_config(os.path.dirname(out))
    # a second run reuses the trained autoencoder and the diffusion checkpoint
    again = run_demo(out, overrides=overrides)
    assert again["stages"]["autoencoder_s"] < metrics["stages"]["autoencoder_s"]
    assert again["text_encoder"]["heldout_probe_accuracy"] == probe  # reloaded, not retrained


def test_train_notebook(demo, tmp_path):
    """``colab/train_tpu.ipynb`` top to bottom on the demo's output folder (``REBUILD=False``, the
    notebook's default: a Colab session reusing its Drive folder): every stage is reused, every cell
    shows its part (:func:`run_demo` itself, trained from nothing, is the test above)."""
    from test_notebooks import check_clean, images_shown, run_notebook, text_of

    out, _ = demo
    nb = run_notebook("train_tpu.ipynb", dict(OVERRIDES=OVERRIDES, OUT_DIR=out, MY_PROMPTS=["a red circle", "a blue star"]),
                      tmp_path)
    check_clean(nb)
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert set(metrics["samples"]) == {"train", "heldout"}
    # data grid, loss plot, 2 splits x (real + one grid per guidance scale of the recipe), own prompts
    from ldm_jax.examples.shapes_demo.config import get_config

    num_guidance = len(get_config().sample.guidance_scales)
    assert images_shown(nb) == 1 + 1 + 2 * (1 + num_guidance) + 1
    text = text_of(nb)
    assert "seconds per stage" in text and "demo bar passed" in text and "diffusion loss: first logged" in text
    assert "backend 'cpu'" in text and "running on the CPU" in text


def test_finetuning_teaches_the_demo_model_a_new_word(demo, tmp_path):
    """The demo's model has never seen "sks". 32 scenes on a purple background, captioned "... on a sks
    background", teach it by LoRA and by textual inversion (100 steps each); the demo's attribute
    classifier then reads a purple background in the samples of 64 held-out "sks" prompts (other shapes,
    colours, positions, wordings) far more often with the fine-tune than without. DreamBooth (the whole
    UNet, 100 steps) on five shots of one subject, "a large red square in the center on a sks background":
    the class prompt's samples ("... on a white background", same seeds) move less with the prior loss
    than without it, and keep their white background. (On the full-size demo model: docs/finetune.md.)"""
    from ldm_jax.examples.shapes_demo.finetune import run_finetune

    out, _ = demo
    m = run_finetune(out, str(tmp_path), num_images=32, num_prompts=64, steps=100, attribute="background",
                     class_images=32)
    rates = {k: m[k]["target_colour_rate"] for k in ("base", "base_plain_prompts", "lora", "textual_inversion")}
    db = m["dreambooth"]
    change = {k: db[k]["class_mean_abs_change"] for k in ("prior", "no_prior")}
    white = {k: db[k]["class_colour_rate"] for k in ("prior", "no_prior")}
    print("purple background read in the samples of 'sks' prompts:", rates, "DreamBooth: class prompt change",
          change, "white background read", white, "(before:", db["base_class_colour_rate"], ") times (s):",
          m["timings_s"])
    assert rates["base"] <= 0.25
    assert rates["lora"] >= rates["base"] + 0.5 and rates["textual_inversion"] >= rates["base"] + 0.5
    assert change["prior"] < 0.5 * change["no_prior"]
    assert white["prior"] >= white["no_prior"] + 0.5
    assert json.load(open(os.path.join(tmp_path, "metrics.json")))["dreambooth"]["prior"]["class_mean_abs_change"] \
        == change["prior"]


def test_demo_diffusion_config_reaches_the_trainer(tmp_path):
    """The demo's scheduler prediction type and text dropout are what the trainer reads
    (``config.train``), so training and the demo's sampling agree."""
    from ldm_jax.config_utils import load_config
    from ldm_jax.examples.shapes_demo.demo import CONFIG, diffusion_train_config
    from ldm_jax.models.tokenizer import PromptTokenizer
    from ldm_jax.tiny_tokenizer import write_tiny_clip_tokenizer

    tok = PromptTokenizer.from_pretrained(write_tiny_clip_tokenizer(str(tmp_path / "tok")))
    cfg = load_config(CONFIG, ["--config.scheduler.prediction_type=v_prediction",
                                "--config.diffusion.text_dropout=0.25"])
    tcfg = diffusion_train_config(cfg, tok, str(tmp_path))
    assert tcfg.train.prediction_type == tcfg.scheduler.prediction_type == "v_prediction"
    assert tcfg.train.text_dropout == 0.25
    assert tcfg.train.min_snr_gamma == cfg.diffusion.min_snr_gamma
    assert tcfg.stages[0]["steps"] == cfg.diffusion.steps and tcfg.train.decay_steps == cfg.diffusion.steps
    # the autoencoder stage trains on the demo's scenes (one shape, drawn at shape_scale), not the defaults'
    from ldm_jax.data import make_source
    from ldm_jax.examples.shapes_demo.demo import autoencoder_train_config
    from ldm_jax.runtime import ynn_options
    from ldm_jax.train import loop

    ae = autoencoder_train_config(cfg, str(tmp_path))
    assert ae.task == "autoencoder" and tcfg.task == "diffusion"
    assert ae.train.num_steps == cfg.autoencoder.steps and ae.train.batch_size == cfg.autoencoder.batch_size
    assert (ae.data.max_shapes, ae.data.shape_scale, ae.data.image_size) == (1, cfg.data.shape_scale, 32)
    assert ae.loss.latent_noise == cfg.autoencoder.latent_noise and tuple(ae.optim.frozen) == ()
    # the decoder fine-tune after it: encoder frozen, clean latents, its own steps, same data
    dec = autoencoder_train_config(cfg, str(tmp_path), decoder=True)
    assert tuple(dec.optim.frozen) == ("encoder", "quant_conv") and dec.loss.latent_noise == 0.0
    assert dec.train.num_steps == cfg.autoencoder.decoder_steps and dec.data.data_dir == ae.data.data_dir
    # each stage's YNNPACK fusions reach its trainer through the one compiler-options setting
    assert loop.compiler_options(ae, "cpu") == ynn_options(cfg.autoencoder.ynn_fusions, "cpu")
    assert loop.compiler_options(ae, "cpu")
    assert tcfg.train.compiler_options == {} and loop.compiler_options(tcfg, "cpu") is None  # XLA's defaults
    ae.data.update(num_train=8, num_validation=2, num_heldout=2)
    assert "s32_n8-2-2_seed0_max1_scale1.15" in repr(make_source(ae.data, ae.data.image_size, workdir=str(tmp_path)))
    # the diffusion stage reads the same scenes when it does not use cached latents
    tcfg.data.update(num_train=8, num_validation=2, num_heldout=2)
    assert "s32_n8-2-2_seed0_max1_scale1.15" in repr(make_source(tcfg.data, 32))


def test_demo_latent_cache_follows_the_encoders(tmp_path):
    """The diffusion stage's cached latents are the frozen encoders' outputs; a rerun with the same
    encoders reuses them, a changed autoencoder re-encodes (never trains on stale latents)."""
    import glob

    import jax
    import numpy as np

    from ldm_jax.config_utils import load_config
    from ldm_jax.data.latents import CachedLatentsSource
    from ldm_jax.examples.shapes_demo.demo import CONFIG, _cache_latents, demo_tokenizer
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.models.clip_text import CLIPTextModel

    out = str(tmp_path)
    cfg = load_config(CONFIG, ["--config.data.num_train=40", "--config.data.num_validation=4",
                                "--config.data.num_heldout=4"])
    tok = demo_tokenizer(cfg, out, num_captions=200)
    length = int(cfg.text_encoder.max_position_embeddings)  # the demo's 32, not CLIP's 77
    cfg.text_encoder.update(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vae, text = AutoencoderKL(**dict(cfg.vae)), CLIPTextModel(**dict(cfg.text_encoder))
    x = np.zeros((1, 32, 32, 3), np.float32)
    vae_params = vae.init(jax.random.key(0), x)["params"]
    text_params = text.init(jax.random.key(1), np.zeros((1, length), np.int32))["params"]

    path = _cache_latents(cfg, tok, vae_params, text_params, out)
    src = CachedLatentsSource(path)
    assert len(src) == 40 and src[0]["moments"].shape == (8, 8, 8) and src[0]["context"].shape == (length, 64)
    first = np.stack([src[i]["moments"] for i in range(4)])
    files = sorted(glob.glob(os.path.join(path, "*.array_record")))
    stamp = [os.path.getmtime(f) for f in files]
    assert _cache_latents(cfg, tok, vae_params, text_params, out) == path
    assert [os.path.getmtime(f) for f in files] == stamp  # same encoders: reused

    other = vae.init(jax.random.key(2), x)["params"]
    _cache_latents(cfg, tok, other, text_params, out)
    src = CachedLatentsSource(path)
    again = np.stack([src[i]["moments"] for i in range(4)])
    assert not np.allclose(again, first)  # re-encoded with the new autoencoder
    # and the record is that autoencoder's posterior of that caption's image (mean, then logvar)
    from ldm_jax.examples.shapes_demo.demo import _examples

    by_caption = {ex["caption"]: ex["image"] for ex in _examples(cfg, "train", 40)}
    rec = src[3]
    image = by_caption[str(rec["caption"])][None].astype(np.float32) / 127.5 - 1.0
    post = vae.apply({"params": other}, image, method=vae.encode)
    np.testing.assert_allclose(rec["moments"][..., :4], np.asarray(post.mean)[0], atol=1e-5)


def test_latent_shape_split_reads_shape_colour_and_interaction(monkeypatch):
    """The two-way analysis of variance of ``latent_shape_split``: latents that carry only the
    shape's colour read colour 1, only its area (which the shape sets) shape 1, their product a
    clear interaction where the additive ones read none; the shares of any latents sum to 1 and do
    not change with the latents' scale."""
    import jax
    import numpy as np

    from ldm_jax.config_utils import load_config
    from ldm_jax.examples.shapes_demo import demo
    from ldm_jax.models.autoencoder import AutoencoderKL

    cfg = load_config(demo.CONFIG)
    vae = AutoencoderKL(**dict(cfg.vae))
    params = vae.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    real = demo.latent_shape_split(cfg, params)
    assert abs(sum(real.values()) - 1.0) < 1e-6 and min(real.values()) >= 0.0
    louder = dict(params, quant_conv={k: 3.0 * v for k, v in params["quant_conv"].items()})  # latents x3
    assert all(abs(demo.latent_shape_split(cfg, louder)[k] - v) < 1e-5 for k, v in real.items())

    def fake(kind):
        def latent_means(vae_config, vae_params, images, batch_size):
            fg = np.any(images != images[:, :1, :1], axis=-1)  # pixels off the background colour
            area = fg.mean((1, 2))[:, None]
            color = (images * fg[..., None]).sum((1, 2)) / fg.sum((1, 2))[:, None]  # the shape's colour
            z = {"color": color, "area": area,
                 "product": (area - area.mean()) * (color - color.mean(0))}[kind]  # centred over all groups
            return z[:, None, None, :]
        return latent_means

    expected = {"color": "color", "area": "shape"}
    for kind, share in expected.items():
        monkeypatch.setattr(demo, "_latent_means", fake(kind))
        got = demo.latent_shape_split(cfg, params)
        assert got[share] > 1 - 1e-6 and got["interaction"] < 1e-6, (kind, got)
    monkeypatch.setattr(demo, "_latent_means", fake("product"))
    got = demo.latent_shape_split(cfg, params)
    assert got["interaction"] > 0.1 and abs(sum(got.values()) - 1.0) < 1e-6, got


def _accuracies(seen: dict, heldout: dict, low: float = 0.5) -> dict:
    lowest = {"color": low, "shape": low, "position": low}

    def row(a):
        return dict(a, mean=sum(a.values()) / 3)
    return {"train": {"1.0": row(lowest), "3.0": row(seen), "7.5": row(seen)},
            "heldout": {"1.0": row(lowest), "3.0": row(heldout), "7.5": row(heldout)}}


def test_the_bar_fails_a_model_that_draws_no_shapes():
    """Perfect colour and position with shape at chance (1 in 5) fails on its worst attribute, shape; so
    does a model whose mean (0.93) clears the bar while its shape (0.79) does not. Good shapes pass;
    each miss is named."""
    from ldm_jax.config_utils import load_config
    from ldm_jax.examples.shapes_demo.demo import CONFIG, judge_bar

    cfg = load_config(CONFIG)
    blobs = {"color": 1.0, "shape": 0.2, "position": 1.0}
    bar = judge_bar(_accuracies(blobs, blobs), cfg.sample.guidance_scales, cfg.eval.targets, num_prompts=256)
    assert not bar["passed"] and any("(shape)" in f for f in bar["failures"])
    high_mean = {"color": 1.0, "shape": 0.79, "position": 1.0}  # mean 0.93, shape just under 0.8
    bar = judge_bar(_accuracies(high_mean, high_mean), cfg.sample.guidance_scales, cfg.eval.targets, num_prompts=256)
    assert bar["seen"]["mean"] >= cfg.eval.targets.seen_mean and not bar["passed"]
    assert bar["failures"] == ["seen worst accuracy (shape) 0.790 < 0.8 at guidance 3.0"]
    good = {"color": 0.97, "shape": 0.85, "position": 1.0}
    bar = judge_bar(_accuracies(good, good), cfg.sample.guidance_scales, cfg.eval.targets, num_prompts=256)
    assert bar["passed"] and bar["failures"] == [] and bar["seen"]["worst_attribute"] == "shape"
    assert abs(bar["seen"]["stderr_worst"] - (0.85 * 0.15 / 256) ** 0.5) < 1e-9
    # guidance must help: the same accuracy at guidance 1 fails
    bar = judge_bar(_accuracies(good, good, low=0.95), cfg.sample.guidance_scales, cfg.eval.targets, num_prompts=256)
    assert not bar["passed"] and any("not above guidance 1.0" in f for f in bar["failures"])


def test_demo_seed_reaches_every_stage(tmp_path):
    """``ldm-jax demo --seed N``: the dataset, the autoencoder's and the diffusion model's training
    (init, data order, dropout) and the sampling noise all follow N."""
    from ldm_jax.examples.shapes_demo.demo import autoencoder_train_config, demo_config, diffusion_train_config
    from ldm_jax.models.tokenizer import PromptTokenizer
    from ldm_jax.tiny_tokenizer import write_tiny_clip_tokenizer

    tok = PromptTokenizer.from_pretrained(write_tiny_clip_tokenizer(str(tmp_path / "tok")))
    seen = []
    for seed in (None, 7):
        cfg = demo_config(seed=seed)
        ae, diff = autoencoder_train_config(cfg, str(tmp_path)), diffusion_train_config(cfg, tok, str(tmp_path))
        seen.append((cfg.seed, ae.data.dataset_seed, ae.train.seed, ae.data.seed, diff.data.dataset_seed,
                     diff.data.seed))
    assert seen[0] == (0, 0, 0, 1, 0, 2)
    assert seen[1] == (7, 7, 7, 8, 7, 9)
    # an output folder built with one seed is not silently reused for another
    import pytest

    from ldm_jax.examples.shapes_demo.demo import _check_seed

    _check_seed(str(tmp_path), 0)
    _check_seed(str(tmp_path), 0)
    with pytest.raises(ValueError, match="built with seed 0, not 7: pass --rebuild"):
        _check_seed(str(tmp_path), 7)
