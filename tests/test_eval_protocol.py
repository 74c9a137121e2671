"""The SD evaluation protocol (guidance sweep -> FID, CLIP score, metrics.json, plot) and `ldm-jax eval`."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ldm_jax.cli import main
from ldm_jax.eval import protocol
from ldm_jax.eval.clip_score import clip_score, load_clip
from ldm_jax.eval.fid import fid_from_features
from ldm_jax.eval.protocol import evaluate_guidance_sweep, read_captions
from ldm_jax.pipeline import StableDiffusionPipeline
from ldm_jax.reference import build_reference_pipeline
from tiny_clip import write_tiny_clip_folder

CAPTIONS = ["a red circle in the top left", "a blue square on a green background", "a photo of a cat",
            "a yellow star in the center"]
RESULT_KEYS = {"guidance_scale", "fid", "clip_score"}


def channel_stats(images):
    """A cheap feature_fn: per-channel means of uint8 NHWC images -> [N, 3]."""
    return np.asarray(images, np.float64).mean(axis=(1, 2))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = str(root / "sd")
    build_reference_pipeline("v1", seed=0).save_pretrained(model)
    clip, _ = write_tiny_clip_folder(root / "clip")
    return model, clip


def _real_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_guidance_sweep_writes_metrics_and_plot(folders, tmp_path):
    model, clip = folders
    pipe = StableDiffusionPipeline.from_pretrained(model)
    out = tmp_path / "out"
    # 16 px and batch 2 in every test here: one compiled shape, shared through the persistent cache
    real, clip = _real_images(6, 16, 16), load_clip(clip)
    metrics = evaluate_guidance_sweep(pipe, CAPTIONS, real, (1.5, 4.0), num_inference_steps=2, sampler="ddim",
                                      seed=0, feature_fn=channel_stats, clip=clip, out_dir=out, batch_size=2,
                                      height=16, width=16, chunk_size=2)  # measured in chunks of 2 images
    written = json.loads((out / "metrics.json").read_text())
    assert written == metrics
    assert {"results", "guidance_scales", "num_generated", "num_real", "num_inference_steps", "sampler", "seed",
            "feature_fn", "feature_dim", "clip_model", "plot"} <= set(written)
    assert written["guidance_scales"] == [1.5, 4.0] and written["num_generated"] == 4 and written["num_real"] == 6
    assert written["feature_fn"] == "channel_stats" and written["feature_dim"] == 3
    assert [r["guidance_scale"] for r in written["results"]] == [1.5, 4.0]
    for r in written["results"]:
        assert set(r) == RESULT_KEYS and np.isfinite(r["fid"]) and r["fid"] >= 0 and 0 <= r["clip_score"] <= 100
    assert written["results"][0]["fid"] != written["results"][1]["fid"]  # guidance changed the images
    with Image.open(out / written["plot"]) as im:
        assert im.format == "PNG" and im.size[0] > 100
    # the same numbers from all images at once
    images = protocol.generate_images(pipe, CAPTIONS, 4.0, num_inference_steps=2, sampler="ddim", batch_size=2)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    last = written["results"][1]
    assert last["fid"] == pytest.approx(fid_from_features(channel_stats(images), channel_stats(real)), rel=1e-9)
    assert last["clip_score"] == pytest.approx(clip_score(clip.model, clip.params, clip.tokenizer, images, CAPTIONS),
                                               abs=1e-4)


def test_generate_images_pads_last_batch_consistently(folders):
    pipe = StableDiffusionPipeline.from_pretrained(folders[0])
    a = protocol.generate_images(pipe, CAPTIONS[:3], 3.0, num_inference_steps=2, sampler="ddim", batch_size=2)
    b = protocol.generate_images(pipe, CAPTIONS[:2], 3.0, num_inference_steps=2, sampler="ddim", batch_size=2)
    assert a.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(a[:2], b)  # batch k is seeded seed + k, whatever follows


def test_read_captions(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("a cat\n\n  a dog \nthird\n")
    assert read_captions(txt) == ["a cat", "a dog", "third"] and read_captions(txt, limit=2) == ["a cat", "a dog"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"caption": "a cat", "id": 1}\n"a dog"\n{"text": "a cow"}\n')
    assert read_captions(jsonl) == ["a cat", "a dog", "a cow"]
    jsonl.write_text('{"image": "x.png"}\n')
    with pytest.raises(ValueError, match=":1: expected a string"):
        read_captions(jsonl)
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(ValueError, match="no captions"):
        read_captions(tmp_path / "e.txt")


def test_cli_eval_end_to_end(folders, tmp_path, monkeypatch, capsys):
    """`ldm-jax eval` with the tiny model and CLIP; Inception (299 px, minutes on CPU) is replaced."""
    model, clip = folders
    used = {}

    def fake_inception(path=None, batch_size=50):
        used["path"] = path
        return channel_stats

    monkeypatch.setattr(protocol, "inception_feature_fn", fake_inception)
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS + ["a fifth caption, not used"]) + "\n")
    real = tmp_path / "real"
    real.mkdir()
    for i, im in enumerate(_real_images(5, 20, 28, seed=1)):  # resized and cropped to the model's 16 px
        Image.fromarray(im).save(real / f"{i}.png")
    out = tmp_path / "out"
    main(["eval", "--model", model, "--captions", str(tmp_path / "captions.txt"), "--real-images", str(real),
          "--out", str(out), "--guidance", "2,5", "--steps", "2", "--sampler", "ddim", "--num", "4",
          "--inception", "inception.pth", "--clip", clip, "--batch-size", "2", "--save-images"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed == metrics["results"] and [r["guidance_scale"] for r in printed] == [2.0, 5.0]
    assert metrics["num_generated"] == 4 and metrics["num_real"] == 5 and metrics["model"] == model
    assert used["path"] == "inception.pth" and metrics["clip_model"] == clip
    assert all(r["clip_score"] is not None for r in printed)
    assert (out / "fid_vs_clip.png").is_file()
    assert sorted(os.listdir(out / "samples" / "w2")) == [f"{i:05d}.png" for i in range(4)]
