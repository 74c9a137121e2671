"""LoRA against the PyTorch world (peft/diffusers) on tiny random SD models: files in and out (diffusers/
PEFT and kohya layouts), the UNet and pipeline outputs, fuse/unfuse, no recompiles, bad files."""
import json
import os

import jax
import numpy as np
import peft  # noqa: F401 - the reference for LoRA files (the test extra): fail here when it is missing
import pytest
import torch

from ldm_jax.convert import WeightsError
from ldm_jax.convert.loading import load_model
from ldm_jax.convert.lora import read_lora, write_lora
from ldm_jax.models import lora as L
from ldm_jax.models.unet import unet_from_config


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]  # proj_*: SD v1's 1x1 convs
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
IMAGE_TOL = 1.0 / 255.0


def _randomise_lora_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _adapt(pipe, seed, rank=4, alpha=8.0, text=True):
    """Add peft adapters (random weights) to the reference pipeline's UNet (and text encoder); returns the
    LoraConfigs."""
    from peft import LoraConfig, inject_adapter_in_model

    ucfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    pipe.unet.add_adapter(ucfg)
    _randomise_lora_(pipe.unet, seed)
    tcfg = None
    if text:
        # transformers 5's own add_adapter wants peft >= 0.22: inject directly (as the issue notes)
        tcfg = LoraConfig(r=2, lora_alpha=2.0, target_modules=TEXT_TARGETS)
        pipe.text_encoder = inject_adapter_in_model(tcfg, pipe.text_encoder)
        _randomise_lora_(pipe.text_encoder, seed + 1)
    return ucfg, tcfg


def _save(pipe, out, ucfg, tcfg):
    from diffusers import StableDiffusionPipeline as TorchPipeline
    from peft import get_peft_model_state_dict

    te = get_peft_model_state_dict(pipe.text_encoder) if tcfg else None
    TorchPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                    text_encoder_lora_layers=te, unet_lora_adapter_metadata=ucfg.to_dict(),
                                    text_encoder_lora_adapter_metadata=tcfg.to_dict() if tcfg else None)
    return os.path.join(out, "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A tiny SD v1 folder, a peft LoRA file of it (UNet rank 4 alpha 8, text encoder rank 2) and the
    diffusers pipeline with that LoRA loaded (``load_lora_weights``)."""
    from ldm_jax.reference import build_reference_pipeline

    root = tmp_path_factory.mktemp("lora")
    folder = str(root / "model")
    build_reference_pipeline("v1", seed=0).save_pretrained(folder)
    donor = build_reference_pipeline("v1", seed=0)
    file = _save(donor, str(root / "peft"), *_adapt(donor, seed=3))
    from diffusers import StableDiffusionPipeline as TorchPipeline

    pipe = TorchPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(file, adapter_name="a")
    return folder, file, pipe, load_model(folder)


def _unet_inputs(seed=0, ctx_dim=32):
    rng = np.random.RandomState(seed)
    return (rng.randn(2, 8, 8, 4).astype(np.float32), np.array([3, 917]),
            rng.randn(2, 7, ctx_dim).astype(np.float32))


def _torch_unet(unet, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    return out.permute(0, 2, 3, 1).numpy()


def _models(loaded):
    return {"unet": loaded.params["unet"], "text_encoder": loaded.params["text_encoder"]}


def test_a_peft_file_gives_diffusers_unet_output(ref):
    folder, file, pipe, loaded = ref
    adapters = read_lora(file, _models(loaded))
    # 4 transformers (down, mid, 2 up): attn1 and attn2 (q, k, v, out) + proj_in/out; 2 text layers x 4
    assert (len(L.adapter_layers(adapters["unet"])), len(L.adapter_layers(adapters["text_encoder"]))) == (40, 8)
    unet = unet_from_config(dict(loaded.config.unet))
    inputs = _unet_inputs()
    want = _torch_unet(pipe.unet, inputs)
    base = np.asarray(unet.apply({"params": loaded.params["unet"]}, *inputs))
    merged = np.asarray(unet.apply({"params": L.merge(loaded.params["unet"], [(adapters["unet"], 1.0)])}, *inputs))
    with L.adapted(adapters["unet"]):
        live = np.asarray(unet.apply({"params": loaded.params["unet"]}, *inputs))
    assert np.abs(base - want).max() > 0.1  # the adapter changes the output: the comparison means something
    np.testing.assert_allclose(merged, want, atol=1e-4)
    np.testing.assert_allclose(live, want, atol=1e-4)


def test_a_peft_file_gives_diffusers_text_encoder_output(ref):
    from ldm_jax.models.clip_text import clip_text_from_config

    folder, file, pipe, loaded = ref
    adapters = read_lora(file, _models(loaded))
    ids = np.asarray(pipe.tokenizer(["a red circle", "a blue square"], padding="max_length", max_length=77,
                                    return_tensors="np").input_ids, np.int32)
    with torch.no_grad():
        want = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
    enc = clip_text_from_config(dict(loaded.config.text_encoder))
    params = L.merge(loaded.params["text_encoder"], [(adapters["text_encoder"], 1.0)])
    np.testing.assert_allclose(np.asarray(enc.apply({"params": params}, ids).context), want, atol=1e-4)


def test_pipeline_with_a_lora_matches_diffusers_and_scales_without_recompiling(ref):
    from ldm_jax.pipeline import StableDiffusionPipeline

    folder, file, torch_pipe, loaded = ref
    ours = StableDiffusionPipeline.from_pretrained(folder)
    latents = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    plain = ours("a red circle", latents=latents, **kw)
    assert ours.load_lora_weights(file, "a", scale=1.0) == "a"
    got = {}
    for scale in (1.0, 0.5):
        torch_pipe.set_adapters(["a"], [scale])
        want = torch_pipe("a red circle", latents=torch.from_numpy(latents), **kw).images
        ours.set_adapters("a", scale)
        got[scale] = ours("a red circle", latents=latents, **kw)
        assert np.abs(got[scale] - want).mean() <= IMAGE_TOL, scale
    assert np.abs(got[1.0] - plain).mean() > 10 * IMAGE_TOL  # the adapter changes the images
    # another adapter of the same shapes, a second one beside it, disabled: the loop compiled once
    ours.load_lora_weights(file, "b", scale=0.3)
    ours.set_adapters(["b"], [0.7])
    ours("a red circle", latents=latents, **kw)
    ours.set_adapters(["a", "b"], [0.5, 0.5])
    both = ours("a red circle", latents=latents, **kw)
    np.testing.assert_allclose(both, got[1.0], atol=1e-5)  # a and b are the same file: 0.5 a + 0.5 b == 1.0 a
    ours.disable_lora()
    np.testing.assert_array_equal(ours("a red circle", latents=latents, **kw), plain)
    ours.enable_lora()
    (loop,) = ours._loops.values()
    assert loop._cache_size() == 1


def test_fuse_then_unfuse_restores_the_base_weights_exactly(ref):
    from ldm_jax.pipeline import StableDiffusionPipeline

    folder, file, _, loaded = ref
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    base = jax.tree.map(np.asarray, pipe.params)
    pipe.load_lora_weights(file, "a", scale=0.8)
    active = jax.tree.map(np.asarray, pipe.params)
    pipe.fuse_lora()
    assert pipe.get_active_adapters() == {}
    for a, b in zip(jax.tree.leaves(active), jax.tree.leaves(pipe.params)):
        np.testing.assert_array_equal(a, b)  # fused == active
    pipe.unload_lora_weights()  # the fused weights stay
    for a, b in zip(jax.tree.leaves(active), jax.tree.leaves(pipe.params)):
        np.testing.assert_array_equal(a, b)
    pipe.unfuse_lora()
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(pipe.params)):
        np.testing.assert_array_equal(a, b)


def _kohya_twin(file, out):
    """The diffusers-layout file rewritten in kohya's layout (as kohya's sd-scripts write SD v1 LoRAs):
    ``lora_unet_<module>``/``lora_te_<module>``, ``lora_down``/``lora_up``, ``.alpha`` per layer."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(file, framework="numpy") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out_t = {}
    for k, v in tensors.items():
        model, rest = k.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        prefix = "lora_unet_" if model == "unet" else "lora_te_text_model_"
        name = prefix + module.replace(".", "_")
        out_t[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = v
        out_t[f"{name}.alpha"] = np.asarray(meta[f"{model}.lora_alpha"], np.float32)
    save_file(out_t, out)
    return out


def test_a_kohya_file_equals_its_diffusers_twin(ref, tmp_path):
    folder, file, _, loaded = ref
    kohya = _kohya_twin(file, str(tmp_path / "kohya.safetensors"))
    a, b = read_lora(file, _models(loaded)), read_lora(kohya, _models(loaded))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_a_lora_written_here_loads_in_diffusers_with_the_same_unet_output(ref, tmp_path):
    from diffusers import UNet2DConditionModel as TorchUNet

    folder, _, _, loaded = ref
    models = _models(loaded)
    adapters = {"unet": L.init_adapters(jax.random.PRNGKey(0), models["unet"], L.UNET_ATTENTION + "|proj_in|proj_out",
                                        rank=4)}
    # a trained adapter has up != 0
    adapters["unet"] = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                                    adapters["unet"])
    file = write_lora(str(tmp_path / "ours"), adapters, rank=4, alpha=2.0, base=models)
    assert file.endswith("pytorch_lora_weights.safetensors")
    unet = unet_from_config(dict(loaded.config.unet))
    inputs = _unet_inputs(1)
    with L.adapted(adapters["unet"], 2.0 / 4):
        ours = np.asarray(unet.apply({"params": models["unet"]}, *inputs))
    from diffusers import StableDiffusionPipeline as TorchPipeline

    pipe = TorchPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(file)
    want = _torch_unet(pipe.unet, inputs)
    assert np.abs(_torch_unet(TorchUNet.from_pretrained(folder, subfolder="unet"), inputs) - want).max() > 0.05
    np.testing.assert_allclose(ours, want, atol=1e-4)
    # and back: the file read here folds alpha/r into up
    back = read_lora(file, models)["unet"]
    np.testing.assert_allclose(np.asarray(unet.apply({"params": L.merge(models["unet"], [(back, 1.0)])}, *inputs)),
                               want, atol=1e-4)


def test_init_adapters_start_as_the_base_model_and_refuse_rank_0(ref):
    loaded = ref[3]
    adapters = L.init_adapters(jax.random.PRNGKey(0), loaded.params["unet"], L.UNET_ATTENTION, rank=2)
    assert all(np.all(np.asarray(a["up"]) == 0) for a in L.adapter_layers(adapters).values())
    assert L.rank_of(adapters) == 2 and L.num_params(adapters) > 0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank must be an integer >= 1"):
            L.init_adapters(jax.random.PRNGKey(0), loaded.params["unet"], L.UNET_ATTENTION, rank=bad)
    with pytest.raises(ValueError, match="match no linear layer"):
        L.init_adapters(jax.random.PRNGKey(0), loaded.params["unet"], r"no_such_layer", rank=2)


def test_bad_lora_files_are_clear_errors(ref, tmp_path):
    from safetensors.numpy import save_file

    folder, file, _, loaded = ref
    models = _models(loaded)
    # another architecture: the v2 reference (wider context) has the same names, other shapes
    from ldm_jax.reference import build_reference_pipeline

    v2 = build_reference_pipeline("v2", seed=0)
    other = _save(v2, str(tmp_path / "v2"), *_adapt(v2, seed=5, text=False))
    with pytest.raises(WeightsError, match="does not fit this model"):
        read_lora(other, models)
    with open(file, "rb") as f:
        blob = f.read()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(WeightsError, match="truncated|corrupt|invalid"):
        read_lora(str(tmp_path / "cut.safetensors"), models)
    torch.save({"unet.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "lora.bin")
    with pytest.raises(WeightsError, match="allow_pickle"):
        read_lora(str(tmp_path / "lora.bin"), models)
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_A.weight": np.zeros((2, 32), np.float32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_B.weight": np.zeros((32, 2), np.float32)},
              str(tmp_path / "unmatched.safetensors"))
    with pytest.raises(WeightsError, match=r"name no linear layer.*attn9"):
        read_lora(str(tmp_path / "unmatched.safetensors"), models)
    save_file({"some.other.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(WeightsError, match=r"not LoRA weights.*some\.other\.weight"):
        read_lora(str(tmp_path / "unknown.safetensors"), models)
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((2, 32), np.float32)},
              str(tmp_path / "half.safetensors"))
    with pytest.raises(WeightsError, match="has no up weight"):
        read_lora(str(tmp_path / "half.safetensors"), models)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_lora(str(tmp_path / "missing.safetensors"), models)
    from ldm_jax.pipeline import StableDiffusionPipeline, parse_lora_arg

    assert parse_lora_arg("gs://b/x.safetensors") == ("gs://b/x.safetensors", 1.0)
    assert parse_lora_arg("x.safetensors:0.5") == ("x.safetensors", 0.5)
    with pytest.raises(ValueError, match="not a number"):
        parse_lora_arg("x.safetensors:1.2.3")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="finite number"):
        pipe.load_lora_weights(file, scale=float("nan"))
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        pipe.set_adapters("zz")


def test_sample_cli_with_lora(ref, tmp_path):
    from ldm_jax.cli import main

    folder, file, _, _ = ref
    out_a, out_b = tmp_path / "plain", tmp_path / "lora"
    common = ["sample", "--model", folder, "--prompt", "a red circle", "--steps", "2", "--height", "16", "--width", "16"]
    main(common + ["--out", str(out_a)])
    main(common + ["--lora", f"{file}:0.9", "--out", str(out_b)])
    from PIL import Image

    a, b = (np.asarray(Image.open(d / "000_00.png"), np.float32) for d in (out_a, out_b))
    assert np.abs(a - b).mean() > 1.0
