"""``ldm-jax demo --recipe faces`` at tiny settings: the text-to-face path a CelebA-HQ user takes (faces in
MM-CelebA-HQ's layout with ten captions an image -> autoencoder workdir -> diffusion with LDM's BERT
trained jointly, the VAE read through ``init.vae`` -> the workdir sampled by ``load_pipeline``) runs end
to end, its loss falls and every figure is written. How well the full-size run follows its prompts:
docs/text2face.md (a tiny run follows its first attribute after ~800 diffusion steps at 32 px, given a
first stage that keeps the hair colour: more than this suite has time for)."""
import json
import os

import pytest

# 16 px faces (4x4 latents); the full-size run and its figures: docs/text2face.md
OVERRIDES = ["--config.data.image_size=16", "--config.data.num_train=128", "--config.data.num_heldout=16",
             "--config.autoencoder.steps=60", "--config.autoencoder.decoder_steps=20",
             "--config.diffusion.steps=80", "--config.diffusion.warmup_steps=5",
             "--config.eval.reader_images=256", "--config.eval.reader_steps=60",
             "--config.eval.num_prompts=8", "--config.eval.batch_size=8", "--config.sample.num_prompts=4"]


@pytest.fixture(scope="module")
def faces_demo(tmp_path_factory):
    from ldm_jax.examples.faces_demo import run_faces_demo

    out = str(tmp_path_factory.mktemp("faces") / "out")
    return out, run_faces_demo(out, overrides=OVERRIDES)


def test_faces_demo_end_to_end_tiny(faces_demo):
    from ldm_jax.data import faces

    out, metrics = faces_demo
    for name in ("metrics.json", "report.html", "samples_seen_g3.0.png", "samples_heldout_g1.0.png", "config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["diffusion_loss_last"] < 0.6 * saved["diffusion_loss_first"], saved
    acc = saved["attribute_accuracy"]
    for split in ("seen", "heldout"):
        assert set(acc[split]) == {"1.0", "3.0"} and set(faces.ATTRIBUTE_NAMES) <= set(acc[split]["3.0"])
        assert set(saved["negated_prompts_accuracy"][split]) == {"3.0"}
        assert all(0.0 <= v <= 1.0 for v in acc[split]["3.0"].values())
    assert set(saved["bar"]) >= {"passed", "failures", "seen", "heldout"}
    assert saved["bar"]["passed"] == (not saved["bar"]["failures"])
    assert saved["within_time_budget"] == (saved["wall_time_s"] <= saved["time_budget_s"])


def test_faces_demo_workdirs_are_the_recipe_path(faces_demo):
    """The diffusion workdir trained its LDMBert (no frozen text encoder; at the demo's quarter learning
    rate) and read the autoencoder's workdir as its VAE."""
    from ldm_jax.examples.faces_demo.config import get_config
    from ldm_jax.train.workdir import load_autoencoder_workdir

    out, metrics = faces_demo
    cfg = json.load(open(os.path.join(out, "diffusion", "config.json")))
    assert cfg["init"]["vae"] == os.path.join(out, "autoencoder_decoder")  # the decoder fine-tune's, when it runs
    assert cfg["train"]["train_text_encoder"] and cfg["text_encoder"]["model_type"] == "ldmbert"
    assert cfg["train"]["text_encoder_lr_scale"] == get_config().diffusion.text_encoder_lr_scale == 0.25
    assert not os.path.exists(os.path.join(out, "diffusion", "frozen", "text_encoder.safetensors"))
    vae_cfg, _, step = load_autoencoder_workdir(os.path.join(out, "autoencoder"))
    assert load_autoencoder_workdir(os.path.join(out, "autoencoder_decoder"))[2] == 20
    assert step == 60 and cfg["vae"]["block_out_channels"] == list(vae_cfg["block_out_channels"])
    assert cfg["init"]["vae_scaling_factor"] == pytest.approx(metrics["scaling_factor"])


def test_cli_demo_picks_the_recipe(monkeypatch):
    """``ldm-jax demo --recipe faces`` runs the faces demo into demo_faces_out; the default stays the shapes demo."""
    import ldm_jax.examples.faces_demo as faces_demo
    import ldm_jax.examples.shapes_demo as shapes_demo
    from ldm_jax.cli import main

    calls = []
    monkeypatch.setattr(faces_demo, "run_faces_demo", lambda **kw: calls.append(("faces", kw["out_dir"])))
    monkeypatch.setattr(shapes_demo, "run_demo", lambda **kw: calls.append(("shapes", kw["out_dir"])))
    main(["demo", "--recipe", "faces"])
    main(["demo"])
    main(["demo", "--recipe", "faces", "--out", "x"])
    assert calls == [("faces", "demo_faces_out"), ("shapes", "demo_out"), ("faces", "x")]
    with pytest.raises(SystemExit):
        main(["demo", "--recipe", "cats"])
