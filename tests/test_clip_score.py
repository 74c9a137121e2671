"""CLIP vision tower / CLIPModel in Flax and the CLIP score against transformers (tiny random CLIP)."""
import json
import os

import jax
import numpy as np
import pytest
import torch

from ldm_jax.convert.torch_flax import WeightsError, clip_params_from_torch
from ldm_jax.eval.clip_score import clip_score, clip_scores, load_clip, preprocess_images
from ldm_jax.models.clip_vision import clip_model_from_config
from tiny_clip import IMAGE_SIZE, write_tiny_clip_folder

TOL = 1e-4
PROMPTS = ["a red circle in the top left", "a photo of a cat", "", "a blue square on a green background",
           "highly detailed digital painting of a castle near the sea at sunset"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, torch CLIPModel, LoadedCLIP) of one tiny random CLIP."""
    folder, ref = write_tiny_clip_folder(tmp_path_factory.mktemp("clip") / "model")
    return folder, ref, load_clip(folder)


@pytest.fixture(scope="module")
def images():
    """Five uint8 images of different shapes (landscape, portrait, square, smaller than 32 px)."""
    rng = np.random.default_rng(0)
    shapes = [(40, 56), (64, 36), (32, 32), (24, 30), (50, 50)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _processor():
    """transformers' PIL-backend CLIP processor (its torchvision backend resizes with another kernel)."""
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_clip_model_matches_transformers(tiny):
    folder, ref, (model, params, tokenizer, _) = tiny
    ids = tokenizer(PROMPTS)
    pixels = np.random.default_rng(1).normal(size=(3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    out = jax.jit(model.apply)({"params": params}, ids, pixels)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    errs = {k: _max_err(getattr(out, k), getattr(want, k).numpy())
            for k in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text")}
    print("max abs err", errs)
    assert out.logits_per_image.shape == (3, len(PROMPTS)) and out.image_embeds.shape == (3, 16)
    assert max(errs.values()) <= TOL, errs
    assert np.std(want.logits_per_image.numpy()) > 0.1  # logits are not degenerate
    # the in-memory state dict converts as the saved file does
    target = jax.eval_shape(model.init, jax.random.key(0), ids, pixels)["params"]
    again = clip_params_from_torch(ref.state_dict(), target)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, again)


def test_config_defaults_and_legacy_dict_fields():
    model = clip_model_from_config({"text_config": {}, "vision_config_dict": {"patch_size": 14, "hidden_size": 1024,
                                                                  "num_attention_heads": 16}})
    assert model.vision_config["patch_size"] == 14 and model.vision_config["hidden_size"] == 1024
    assert model.image_size == 224 and model.max_text_length == 77 and model.projection_dim == 512
    with pytest.raises(ValueError, match="not a CLIPModel config"):
        clip_model_from_config({"model_type": "clip_text_model", "hidden_size": 32})


def test_preprocess_matches_clip_image_processor(images):
    want = _processor()(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    got = preprocess_images(images, IMAGE_SIZE)
    assert got.shape == (len(images), IMAGE_SIZE, IMAGE_SIZE, 3) and got.dtype == np.float32
    print("preprocess max abs err", _max_err(got, want))
    assert _max_err(got, want) <= 1e-5


def test_clip_score_matches_torch(tiny, images):
    folder, ref, (model, params, tokenizer, _) = tiny
    from transformers import CLIPTokenizer

    pixels = _processor()(images=images, return_tensors="pt")["pixel_values"]
    text = CLIPTokenizer.from_pretrained(folder)(PROMPTS, padding=True, return_tensors="pt")  # torchmetrics' call
    with torch.no_grad():
        out = ref(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    want = 100 * np.maximum(cos, 0)
    got = clip_scores(model, params, tokenizer, images, PROMPTS, batch_size=2)  # last batch padded
    print("per-image", got, "max abs err", _max_err(got, want))
    assert got.shape == (len(images),)
    assert _max_err(got, want) <= 1e-3
    assert (cos > 0).any()
    assert clip_score(model, params, tokenizer, images, PROMPTS) == pytest.approx(float(want.mean()), abs=1e-3)
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        clip_scores(model, params, tokenizer, images, PROMPTS[:4])


def test_load_clip_errors(tiny, tmp_path):
    folder = tiny[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_clip(os.path.join(folder, "config.json"))
    with pytest.raises(FileNotFoundError, match="could not be fetched"):  # tests run with HF_HUB_OFFLINE=1
        load_clip("nobody-here/no-such-clip")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip(str(empty))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_clip(str(bad))
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="corrupt"):
        load_clip(str(bad))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not a valid CLIPModel config"):
        load_clip(str(bad))
    # weights that do not fit the config
    config = json.load(open(os.path.join(folder, "config.json")))
    config["projection_dim"] = 24
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes(open(os.path.join(folder, "model.safetensors"), "rb").read())
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_clip(str(bad))
