"""Textual inversion: embeddings in diffusers' layout load as diffusers loads them, a run through the one
training loop learns only the placeholder's vectors, and its workdir samples with the new word."""
import os

import jax
import numpy as np
import pytest
import torch

from ldm_jax.config_utils import load_config
from ldm_jax.convert.loading import load_model
from ldm_jax.train import diffusion_task as D

FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from ldm_jax.reference import write_reference_folder

    return write_reference_folder(str(tmp_path_factory.mktemp("base") / "model"), "v1", seed=0)


def _images(path, n=16, size=16):
    """Red squares captioned with the placeholder."""
    from PIL import Image

    path.mkdir(parents=True)
    for i in range(n):
        img = np.full((size, size, 3), 200, np.uint8)
        img[4:12, 4:12] = (220, 30, 30)
        Image.fromarray(img).save(path / f"{i:03d}.png")
        (path / f"{i:03d}.txt").write_text("a photo of a <sq> square" if i % 2 else "<sq>")
    return str(path)


def _embeds_file(path, token, vectors):
    from safetensors.torch import save_file

    save_file({token: torch.from_numpy(vectors)}, str(path))  # as diffusers' textual_inversion.py saves
    return str(path)


def _torch_context(pipe, prompt):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0].numpy()


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_an_embedding_gives_diffusers_text_conditioning(folder, tmp_path, num_vectors):
    from diffusers import StableDiffusionPipeline as TorchPipeline

    from ldm_jax.pipeline import StableDiffusionPipeline

    vectors = np.random.default_rng(num_vectors).normal(size=(num_vectors, 32)).astype(np.float32)
    file = _embeds_file(tmp_path / "learned_embeds.safetensors", "<cat-toy>", vectors if num_vectors > 1 else vectors[0])
    ref = TorchPipeline.from_pretrained(folder, safety_checker=None)
    ref.load_textual_inversion(file)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    assert ours.load_textual_inversion(str(tmp_path)) == "<cat-toy>"
    prompt = "a <cat-toy> on a red square"
    # diffusers expands a multi-vector token inside its pipeline call (maybe_convert_prompt)
    want = _torch_context(ref, ref.maybe_convert_prompt(prompt, ref.tokenizer))
    got = np.asarray(ours.encode_prompt([prompt]))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - np.asarray(ours.encode_prompt(["a object on a red square"]))).max() > 0.01
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        ours.load_textual_inversion(file)
    _embeds_file(tmp_path / "wide.safetensors", "<wide>", np.zeros((1, 48), np.float32))
    with pytest.raises(ValueError, match="width 48"):
        ours.load_textual_inversion(str(tmp_path / "wide.safetensors"))


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    images = _images(tmp_path_factory.mktemp("data") / "images")
    c = load_config("tiny_textual_inversion", [f"--config.init.pretrained={folder}", "--config.data.source=folder",
                                               f"--config.data.path={images}",
                                               "--config.textual_inversion.placeholder_token=<sq>",
                                               "--config.textual_inversion.initializer_token=square",
                                               "--config.textual_inversion.num_vectors=2"])
    c.stages = [dict(resolution=16, steps=10, batch_size=8)]
    c.train.update(dict(progress=False, tensorboard=False, log_every=1, checkpoint_every=5, compiler_options=FAST))
    c.mesh = dict(data=2)
    work = str(tmp_path_factory.mktemp("ti_run"))
    state, hist = D.train(c, work, devices=jax.devices()[:2])
    return c, work, state, hist


def test_only_the_placeholder_vectors_train(run, folder):
    c, work, state, hist = run
    assert set(state.params) == {"token_embeds"} and state.params["token_embeds"].shape == (2, 32)
    assert sorted(tuple(x.shape) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0) == [(2, 32), (2, 32)]
    base = load_model(folder)
    table = np.asarray(base.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    from ldm_jax.models.tokenizer import PromptTokenizer

    square = PromptTokenizer.from_pretrained(folder, subfolder="tokenizer").tokenizer(
        "square", add_special_tokens=False).input_ids
    start = table[[square[i % len(square)] for i in range(2)]]
    assert np.abs(np.asarray(state.params["token_embeds"]) - start).max() > 1e-3  # the vectors moved
    assert all(np.isfinite(h["loss"]) for h in hist)


def test_the_workdir_samples_with_the_new_word_and_exports_diffusers_embeddings(run, folder, tmp_path):
    from diffusers import StableDiffusionPipeline as TorchPipeline

    from ldm_jax.cli import main
    from ldm_jax.pipeline import StableDiffusionPipeline

    c, work, state, _ = run
    pipe = StableDiffusionPipeline.from_pretrained(work)  # the workdir's tokenizer has <sq>, <sq>_1
    assert pipe.tokenizer.placeholders == {"<sq>": ["<sq>", "<sq>_1"]}
    base = load_model(folder)
    for a, b in zip(jax.tree.leaves(base.params["unet"]), jax.tree.leaves(load_model(work).params["unet"])):
        np.testing.assert_array_equal(a, b)  # the UNet is the pretrained one
    images = pipe("a <sq> square", num_inference_steps=2, height=16, width=16, output_type="np")
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    main(["convert", work, str(tmp_path / "export"), "--adapter"])
    assert os.listdir(tmp_path / "export") == ["learned_embeds.safetensors"]
    ref = TorchPipeline.from_pretrained(folder, safety_checker=None)
    ref.load_textual_inversion(str(tmp_path / "export"))
    prompt = "a <sq> on a red square"
    want = _torch_context(ref, ref.maybe_convert_prompt(prompt, ref.tokenizer))
    np.testing.assert_allclose(np.asarray(pipe.encode_prompt([prompt])), want, atol=1e-4)
    # the base model with the exported embedding, renamed, from the command line
    common = ["sample", "--model", folder, "--prompt", "a <x> square", "--steps", "2", "--height", "16", "--width", "16"]
    main(common + ["--textual-inversion", f"{tmp_path / 'export'}:<x>", "--out", str(tmp_path / "with")])
    main(common + ["--out", str(tmp_path / "without")])
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / d / "000_00.png"), np.float32) for d in ("with", "without"))
    assert np.abs(a - b).mean() > 0.5


def test_bad_textual_inversion_settings_are_clear_errors(folder, tmp_path):
    for key, value, match in (("placeholder_token", "two words", "one word without spaces"),
                              ("num_vectors", 0, "num_vectors must be an integer >= 1"),
                              ("placeholder_token", "circle", "already in the tokenizer's vocabulary")):
        c = load_config("tiny_textual_inversion", [f"--config.init.pretrained={folder}"])
        c.textual_inversion[key] = value
        with pytest.raises(ValueError, match=match):
            D.train(c, str(tmp_path / str(value)), devices=jax.devices()[:1])
