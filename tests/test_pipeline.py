"""Sampling pipeline against diffusers' PyTorch pipelines on tiny random SD folders."""
import os

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh

from ldm_jax.pipeline import StableDiffusionPipeline
from ldm_jax.reference import build_reference_pipeline

PROMPTS = ["a red circle in the top left", "a blue square on a green background"]
NEGATIVE = ["blurry", "ugly dark"]
STEPS = 10
IMAGE_TOL = 1.0 / 255.0  # mean absolute difference of images in [0, 1]


def _mode_latents(encoder_output, generator=None, sample_mode="sample"):
    """Deterministic VAE encoding for the reference (ours uses posterior='mode')."""
    return encoder_output.latent_dist.mode()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd") / "model")
    build_reference_pipeline("v1", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipes(folder):
    from diffusers import StableDiffusionPipeline as TorchPipeline

    ref = TorchPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return ref, StableDiffusionPipeline.from_pretrained(folder)


def _noise(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("sampler,scheduler_cls", [
    ("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler"), ("euler", "EulerDiscreteScheduler")])
def test_txt2img_matches_diffusers(pipes, sampler, scheduler_cls):
    import diffusers

    ref, ours = pipes
    ref.scheduler = getattr(diffusers, scheduler_cls).from_config(ref.scheduler.config)
    latents = _noise((2, 4, 8, 8), 0)  # NCHW, as diffusers takes them
    want = ref(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
               latents=torch.from_numpy(latents), output_type="np").images
    got = ours(PROMPTS, NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, sampler=sampler,
               latents=latents, output_type="np")
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert np.abs(got - want).mean() <= IMAGE_TOL
    assert want.std() > 0.05  # images are not flat, so the comparison means something


def test_latents_layouts_agree(pipes):
    _, ours = pipes
    nchw = _noise((1, 4, 8, 8), 1)
    a = ours(PROMPTS[0], num_inference_steps=3, latents=nchw, output_type="np")
    b = ours(PROMPTS[0], num_inference_steps=3, latents=nchw.transpose(0, 2, 3, 1), output_type="np")
    np.testing.assert_array_equal(a, b)


def test_img2img_matches_diffusers(pipes, monkeypatch):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module

    ref, ours = pipes
    monkeypatch.setattr(img2img_module, "retrieve_latents", _mode_latents)
    ref_i2i = StableDiffusionImg2ImgPipeline(**{**ref.components, "scheduler": DDIMScheduler.from_config(ref.scheduler.config)})
    ref_i2i.set_progress_bar_config(disable=True)
    image = np.random.default_rng(2).uniform(0, 1, (16, 16, 3)).astype(np.float32)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()
    want = ref_i2i(PROMPTS[0], image=torch.from_numpy(image.transpose(2, 0, 1)[None] * 2 - 1), strength=0.6,
                   num_inference_steps=STEPS, guidance_scale=7.5, generator=gen, output_type="np").images
    got = ours.img2img(PROMPTS[0], image, strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5,
                       sampler="ddim", noise=noise, posterior="mode", output_type="np")
    assert np.abs(got - want).mean() <= IMAGE_TOL


@pytest.mark.parametrize("in_channels", [9, 4])
def test_inpaint_matches_diffusers(monkeypatch, tmp_path, in_channels):
    from diffusers import DDIMScheduler
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module

    monkeypatch.setattr(inpaint_module, "retrieve_latents", _mode_latents)
    ref = build_reference_pipeline("v1", seed=3, inpainting=True)
    if in_channels == 4:  # an ordinary UNet: diffusers blends the known region back in every step
        ref = inpaint_module.StableDiffusionInpaintPipeline(**build_reference_pipeline("v1", seed=3).components)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    if in_channels == 9:  # the random UNet barely reads its mask and masked-image inputs: make it lean on them
        with torch.no_grad():
            ref.unet.conv_in.weight[:, 4:] *= 30
    ref.save_pretrained(str(tmp_path / "inpaint"))
    ours = StableDiffusionPipeline.from_pretrained(str(tmp_path / "inpaint"))
    rng = np.random.default_rng(4)
    image = rng.uniform(0, 1, (16, 16, 3)).astype(np.float32)
    mask = np.zeros((16, 16), np.float32)
    mask[4:12, 2:10] = 1.0
    latents = _noise((1, 4, 8, 8), 5)
    want = ref(PROMPTS[1], image=torch.from_numpy(image.transpose(2, 0, 1)[None]),
               mask_image=torch.from_numpy(mask[None, None]), height=16, width=16, num_inference_steps=STEPS,
               guidance_scale=7.5, latents=torch.from_numpy(latents), output_type="np").images
    got = ours.inpaint(PROMPTS[1], image, mask, num_inference_steps=STEPS, guidance_scale=7.5, sampler="ddim",
                       latents=latents, posterior="mode", output_type="np")
    assert np.abs(got - want).mean() <= IMAGE_TOL


def test_guidance_seed_and_prompt_do_not_recompile(pipes):
    _, ours = pipes
    ours._loops.clear()
    ours("a red circle", num_inference_steps=4, guidance_scale=7.5, seed=0, output_type="np")
    (loop,) = ours._loops.values()
    assert loop._cache_size() == 1
    ours("a green star at the bottom", num_inference_steps=4, guidance_scale=3.0, seed=1, output_type="np")
    ours("blue", "red", num_inference_steps=4, guidance_scale=12.5, guidance_rescale=0.7, seed=7, output_type="np")
    assert len(ours._loops) == 1 and loop._cache_size() == 1


def test_sharded_batch_equals_single_device(folder):
    assert jax.device_count() == 8
    prompts = [f"a shape number {i}" for i in range(8)]
    latents = _noise((8, 8, 8, 4), 6)
    one = StableDiffusionPipeline.from_pretrained(folder, mesh=Mesh(np.array(jax.devices()[:1]), ("data",)))
    many = StableDiffusionPipeline.from_pretrained(folder)
    a = one(prompts, num_inference_steps=3, latents=latents, output_type="np")
    b = many(prompts, num_inference_steps=3, latents=latents, output_type="np")
    # Same per-image arithmetic; XLA may vectorise reductions differently per device partition,
    # so allow float32 reassociation noise (far below one 8-bit level, 3.9e-3).
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_sampling_compiler_options(folder, pipes):
    """The pipeline's jits (sampling loop, VAE, text encoder) compile with the backend's defaults unless
    the process opted into the CPU tuning (then YNNPACK takes dots and reductions on the CPU) or options
    are given; the images agree."""
    from ldm_jax import runtime

    _, ours = pipes
    assert ours.compiler_options is None  # the library's default: XLA's own
    try:
        assert runtime.enable_cpu_tuning("cpu")
        tuned = StableDiffusionPipeline.from_pretrained(folder)
    finally:
        runtime.disable_cpu_tuning()
    assert tuned.compiler_options == runtime.ynn_options(("dot", "reduce"), "cpu") is not None
    given = StableDiffusionPipeline.from_pretrained(folder, compiler_options={"xla_backend_optimization_level": 1})
    assert given.compiler_options == {"xla_backend_optimization_level": 1}
    latents = _noise((2, 8, 8, 4), 8)
    a = ours(PROMPTS, num_inference_steps=3, latents=latents, output_type="np")
    b = tuned(PROMPTS, num_inference_steps=3, latents=latents, output_type="np")
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=20), "multiple of 8"),
    (dict(width=0), "multiple of 8"),
    (dict(sampler="heun3000"), "unknown sampler"),
    (dict(num_inference_steps=0), ">= 1"),
])
def test_bad_txt2img_input_fails_before_compiling(pipes, kwargs, match):
    _, ours = pipes
    ours._loops.clear()
    with pytest.raises(ValueError, match=match):
        ours("a circle", **kwargs)
    assert not ours._loops


def test_bad_prompts_strength_and_mask(pipes):
    _, ours = pipes
    with pytest.raises(ValueError, match="empty"):
        ours([])
    image = np.zeros((16, 16, 3), np.float32)
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength"):
            ours.img2img("x", image, strength=strength)
    with pytest.raises(ValueError, match="mask is 8x8"):
        ours.inpaint("x", image, np.zeros((8, 8), np.float32))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionPipeline.from_pretrained(str(tmp_path / "nope"))


def test_cli_sample_writes_pngs_and_grid(folder, tmp_path):
    from PIL import Image

    from ldm_jax.cli import main

    out = tmp_path / "out"
    main(["sample", "--model", folder, "--prompt", "a red circle", "--prompt", "a blue star", "--steps", "2",
          "--num-images", "2", "--out", str(out)])
    files = sorted(os.listdir(out))
    assert files == ["000_00.png", "000_01.png", "001_00.png", "001_01.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (32, 32)
    assert Image.open(out / "000_00.png").size == (16, 16)


# ----------------------------------------------------------------------------------------------
# One seed and one guidance scale per image: an image does not depend on its batch


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])  # deterministic, and one drawing noise every step
def test_per_image_seeds_and_guidance_do_not_depend_on_the_batch(pipes, sampler):
    _, ours = pipes
    prompts = ["a red circle", "a blue square", "a green star", "a small yellow disc"]
    seeds, scales = [11, 12, 13, 2**32 - 1], [1.5, 3.0, 5.0, 7.5]
    kw = dict(num_inference_steps=4, sampler=sampler, output_type="np")
    together = ours(prompts, seed=seeds, guidance_scale=scales, **kw)
    # the same batch size, other neighbours: bit-identical rows
    others = ours(["a white box", prompts[1], "noise", prompts[3]], seed=[5, seeds[1], 6, seeds[3]],
                  guidance_scale=[9.0, scales[1], 2.0, scales[3]], **kw)
    np.testing.assert_array_equal(others[1], together[1])
    np.testing.assert_array_equal(others[3], together[3])
    assert np.abs(others[0] - together[0]).mean() > 1e-3  # and the rows do differ
    # alone (another batch size, another compiled loop): the same image to within 1/255 per pixel
    for i in range(4):
        alone = ours([prompts[i]], seed=[seeds[i]], guidance_scale=[scales[i]], **kw)
        assert np.abs(alone[0] - together[i]).max() <= 1 / 255, i
    # one image: a one-seed list is the int seed; num_images_per_prompt repeats a prompt's scale
    np.testing.assert_array_equal(ours(prompts[0], seed=seeds[0], guidance_scale=scales[0], **kw),
                                  ours([prompts[0]], seed=[seeds[0]], guidance_scale=[scales[0]], **kw))
    pairs = ours(prompts[:2], seed=[1, 2, 3, 4], guidance_scale=[2.0, 6.0], num_images_per_prompt=2, **kw)
    rows = ours([prompts[0], prompts[0], prompts[1], prompts[1]], seed=[1, 2, 3, 4],
                guidance_scale=[2.0, 2.0, 6.0, 6.0], **kw)
    np.testing.assert_array_equal(pairs, rows)


def test_per_image_values_reuse_the_compiled_loop_and_bad_ones_are_clear_errors(pipes):
    _, ours = pipes
    kw = dict(num_inference_steps=3, sampler="ddim", output_type="latent")
    ours(["a", "b"], seed=[1, 2], guidance_scale=[2.0, 4.0], **kw)
    compiled = {spec: loop._cache_size() for spec, loop in ours._loops.items()}
    ours(["c", "d"], seed=[7, 9], guidance_scale=[8.0, 1.5], **kw)  # new prompts, seeds, scales
    assert {spec: loop._cache_size() for spec, loop in ours._loops.items()} == compiled
    for bad, match in ((dict(seed=[1]), "one integer in"), (dict(seed=[1, -1]), "one integer in"),
                       (dict(seed=[1, 2**32]), "one integer in"), (dict(seed=[1, True]), "one integer in"),
                       (dict(seed="3"), "seed must be an integer"), (dict(guidance_scale=[2.0]), "one per prompt"),
                       (dict(guidance_scale=[2.0, float("nan")]), "finite number")):
        with pytest.raises(ValueError, match=match):
            ours(["a", "b"], **{**kw, **bad})
