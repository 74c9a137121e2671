"""Weights in and out: file reading, the original<->diffusers table, diffusers folders, export.

Reference models are tiny random diffusers/transformers PyTorch models built here; every parameter
is perturbed so zero-initialised paths are exercised.
"""
import copy
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel

from ldm_jax.convert import (WeightsError, diffusers_to_original, export_diffusers, infer_configs,
                             load_pipeline_weights, load_single_file, load_state_dict, original_to_diffusers,
                             save_state_dict)
from ldm_jax.convert.original import detect_model, ema_key
from ldm_jax.models.autoencoder import AutoencoderKL, vae_from_config
from ldm_jax.models.clip_text import clip_text_from_config
from ldm_jax.models.unet import unet_from_config

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizer import VOCAB_SIZE, write_tiny_clip_tokenizer  # noqa: E402

UNET_CFG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                cross_attention_dim=32, norm_num_groups=8)
VAE_CFG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
               norm_num_groups=8, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2)
TEXT_CFG = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1)
# What the tensor shapes cannot tell load_single_file (SD conventions differ for tiny models).
SINGLE_FILE_OVERRIDES = dict(unet_config=dict(norm_num_groups=8, attention_head_dim=8),
                             vae_config=dict(norm_num_groups=8, sample_size=16),
                             text_encoder_config=dict(num_attention_heads=4))
TOL = 1e-4


def _perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _np_sd(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def torch_models():
    torch.manual_seed(0)
    unet = _perturb(TorchUNet(**UNET_CFG), 1)
    vae = _perturb(TorchAutoencoderKL(**VAE_CFG), 2)
    text = _perturb(TorchCLIPTextModel(CLIPTextConfig(**TEXT_CFG)), 3)
    return unet, vae, text


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return dict(latents=rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
                t=np.array([10, 700], np.int32),
                context=rng.standard_normal((2, 7, 32)).astype(np.float32),
                images=rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32),
                ids=rng.integers(0, VOCAB_SIZE - 2, (2, 7)).astype(np.int32))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_outputs(unet, vae, text, x):
    with torch.no_grad():
        post = vae.encode(_nchw(x["images"])).latent_dist
        return dict(
            unet=_nhwc(unet(_nchw(x["latents"]), torch.from_numpy(x["t"]).long(),
                            encoder_hidden_states=torch.from_numpy(x["context"])).sample),
            vae_mean=_nhwc(post.mean), vae_logvar=_nhwc(post.logvar),
            vae_decode=_nhwc(vae.decode(_nchw(x["latents"][:1])).sample),
            text=text(torch.from_numpy(x["ids"]).long()).last_hidden_state.numpy())


def _flax_outputs(loaded, x):
    """Our models on ``x`` (jitted: op-by-op dispatch of the UNet is slower than compiling it on CPU)."""
    cfg, p = loaded.config, loaded.params
    unet, vae, text = unet_from_config(cfg.unet), vae_from_config(cfg.vae), clip_text_from_config(cfg.text_encoder)

    @jax.jit
    def run(p, x):
        post = vae.apply({"params": p["vae"]}, x["images"], method=AutoencoderKL.encode)
        return dict(
            unet=unet.apply({"params": p["unet"]}, x["latents"], x["t"], x["context"]),
            vae_mean=post.mean, vae_logvar=post.logvar,
            vae_decode=vae.apply({"params": p["vae"]}, x["latents"][:1], method=AutoencoderKL.decode),
            text=text.apply({"params": p["text_encoder"]}, x["ids"]).last_hidden_state)

    return jax.tree_util.tree_map(np.asarray, run(p, x))


def _assert_close(got, want, tol=TOL):
    for name in want:
        err = float(np.max(np.abs(np.asarray(got[name]) - want[name])))
        print(f"{name}: max abs error {err:.2e}")  # shown with pytest -s
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol}"


def _write_folder(path, unet, vae, text):
    os.makedirs(path, exist_ok=True)
    unet.save_pretrained(os.path.join(path, "unet"))
    vae.save_pretrained(os.path.join(path, "vae"))
    text.save_pretrained(os.path.join(path, "text_encoder"))
    write_tiny_clip_tokenizer(os.path.join(path, "tokenizer"))
    os.makedirs(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                   "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "steps_offset": 1,
                   "skip_prk_steps": True}, f)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None]}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f)
    return path


@pytest.fixture(scope="module")
def folder(torch_models, tmp_path_factory):
    return _write_folder(str(tmp_path_factory.mktemp("sd") / "tiny-sd"), *torch_models)


@pytest.fixture(scope="module")
def reference(torch_models, inputs):
    return _torch_outputs(*torch_models, inputs)


@pytest.fixture(scope="module")
def loaded(folder):
    return load_pipeline_weights(folder)


@pytest.fixture(scope="module")
def flax_outputs(loaded, inputs):
    return _flax_outputs(loaded, inputs)


# ------------------------------------------------------------------------------------- file reading
def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty.safetensors.*empty"):
        load_state_dict(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"1234")
    with pytest.raises(WeightsError, match="weights.npz.*unknown extension"):
        load_state_dict(path)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_state_dict({"a": np.ones((64, 64), np.float32), "b": np.zeros(3, np.float32)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.safetensors.*truncated"):
        load_state_dict(path)
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(WeightsError, match="cut.safetensors.*(truncated|corrupt)"):
        load_state_dict(path)


def test_safetensors_half_precision_read_as_float32(tmp_path):
    import safetensors.torch

    ref = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "f16": torch.randn(4).half(), "i64": torch.arange(6)}
    safetensors.torch.save_file(ref, str(tmp_path / "w.safetensors"))
    got = load_state_dict(tmp_path / "w.safetensors")
    assert got["bf16"].dtype == np.float32 and got["f16"].dtype == np.float32 and got["i64"].dtype == np.int64
    for k, v in ref.items():
        np.testing.assert_array_equal(got[k], v.to(torch.float32 if v.is_floating_point() else v.dtype).numpy())
    # and our writer round-trips through safetensors' own reader
    save_state_dict({"x": np.asarray(got["bf16"], jnp.bfloat16)}, tmp_path / "o.safetensors")
    back = safetensors.torch.load_file(str(tmp_path / "o.safetensors"))
    assert back["x"].dtype == torch.bfloat16 and torch.equal(back["x"], ref["bf16"])


def test_pickle_refused_without_allow_pickle_and_read_with_it(tmp_path):
    path = tmp_path / "model.ckpt"
    sd = {"a.weight": torch.randn(2, 3), "b": torch.randn(4).half()}
    torch.save({"state_dict": sd, "global_step": 7}, str(path))
    with pytest.raises(WeightsError, match="(?s)model.ckpt.*arbitrary code.*allow_pickle=True"):
        load_state_dict(path)
    got = load_state_dict(path, allow_pickle=True)
    assert set(got) == set(sd)
    np.testing.assert_array_equal(got["a.weight"], sd["a.weight"].numpy())
    assert got["b"].dtype == np.float32


def test_sharded_safetensors(tmp_path):
    save_state_dict({"a": np.ones(2, np.float32)}, tmp_path / "m-00001.safetensors")
    save_state_dict({"b": np.full(3, 2.0, np.float32)}, tmp_path / "m-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "m-00001.safetensors", "b": "m-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    got = load_state_dict(tmp_path / "m.safetensors.index.json")
    assert sorted(got) == ["a", "b"] and got["b"].tolist() == [2.0, 2.0, 2.0]
    os.remove(tmp_path / "m-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="m-00002.safetensors"):
        load_state_dict(tmp_path / "m.safetensors.index.json")


# ------------------------------------------------------------------------------------- original <-> diffusers table
@pytest.mark.parametrize("variant", ["sd_like", "linear_3_levels"])
def test_unet_table_matches_diffusers_converter(variant):
    cfg = dict(UNET_CFG)
    if variant == "linear_3_levels":
        cfg.update(block_out_channels=(32, 32, 64), layers_per_block=2, use_linear_projection=True,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    torch.manual_seed(0)
    sd = _np_sd(TorchUNet(**cfg))
    orig = diffusers_to_original(unet=sd, unet_config=cfg)
    assert all(k.startswith("model.diffusion_model.") for k in orig)
    ref = sfu.convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in orig.items()}, dict(cfg))
    back = original_to_diffusers(orig, cfg, VAE_CFG)["unet"]
    assert set(ref) == set(sd) == set(back)
    for k in sd:
        np.testing.assert_array_equal(ref[k].numpy(), sd[k])
        np.testing.assert_array_equal(back[k], sd[k])
    inferred = infer_configs(orig)["unet"]
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "in_channels",
                "out_channels", "cross_attention_dim"):
        assert tuple(np.atleast_1d(inferred[key])) == tuple(np.atleast_1d(cfg[key])), key
    assert inferred["use_linear_projection"] == cfg.get("use_linear_projection", False)


def test_vae_table_matches_diffusers_converter(torch_models):
    sd = _np_sd(torch_models[1])
    orig = diffusers_to_original(vae=sd, vae_config=VAE_CFG)
    assert orig["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)  # 1x1 conv there
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in orig  # decoder levels reversed
    ref = sfu.convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in orig.items()}, VAE_CFG)
    back = original_to_diffusers(orig, UNET_CFG, VAE_CFG)["vae"]
    assert set(ref) == set(sd) == set(back)
    for k in sd:
        np.testing.assert_array_equal(ref[k].numpy(), sd[k])
        np.testing.assert_array_equal(back[k], sd[k])


@pytest.mark.parametrize("fmt", ["clip", "open_clip"])
def test_text_table_matches_diffusers_converter(torch_models, fmt):
    text = torch_models[2]
    sd = {k if k.startswith("text_model.") else f"text_model.{k}": v
          for k, v in _np_sd(text).items() if "position_ids" not in k}
    orig = diffusers_to_original(text_encoder=sd, text_encoder_format=fmt)
    tensors = {k: torch.from_numpy(v) for k, v in orig.items()}
    if fmt == "clip":
        ref = sfu.convert_ldm_clip_checkpoint(tensors)
    else:
        assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in orig
        ref = sfu.convert_open_clip_checkpoint(text, tensors)
    back = original_to_diffusers(orig, UNET_CFG, VAE_CFG, drop_last_open_clip_layer=False)["text_encoder"]
    assert set(ref) == set(sd) == set(back)
    for k in sd:
        np.testing.assert_array_equal(ref[k].numpy(), sd[k])
        np.testing.assert_array_equal(back[k], sd[k])


def test_detect_v1_v2_inpainting():
    sd = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3)),
          "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": np.zeros((320, 768))}
    assert detect_model(sd) == {"version": "v1", "inpainting": False, "ema": False}
    sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = np.zeros((320, 1024))
    sd["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((320, 9, 3, 3))
    assert detect_model(sd) == {"version": "v2", "inpainting": True, "ema": False}
    with pytest.raises(WeightsError, match="not an original Stable Diffusion checkpoint"):
        detect_model({"foo.weight": np.zeros(3)})


# ------------------------------------------------------------------------------------- diffusers folders
def test_folder_outputs_match_pytorch(flax_outputs, reference, loaded):
    _assert_close(flax_outputs, reference)
    assert tuple(loaded.config.unet.block_out_channels) == (32, 64)
    assert loaded.config.scheduler.prediction_type == "epsilon"
    assert os.path.isfile(os.path.join(loaded.tokenizer_path, "vocab.json"))


def test_export_reloads_in_diffusers_and_transformers(loaded, reference, inputs, tmp_path):
    out = export_diffusers(loaded, tmp_path / "export")
    unet = TorchUNet.from_pretrained(os.path.join(out, "unet")).eval()
    vae = TorchAutoencoderKL.from_pretrained(os.path.join(out, "vae")).eval()
    text = TorchCLIPTextModel.from_pretrained(os.path.join(out, "text_encoder")).eval()
    _assert_close(_torch_outputs(unet, vae, text, inputs), reference, tol=1e-6)
    again = load_pipeline_weights(out)
    for name in ("unet", "vae", "text_encoder"):
        a, b = jax.tree_util.tree_leaves(again.params[name]), jax.tree_util.tree_leaves(loaded.params[name])
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert os.path.isfile(os.path.join(out, "tokenizer", "vocab.json"))
    assert json.load(open(os.path.join(out, "model_index.json")))["_class_name"] == "StableDiffusionPipeline"


def test_fp16_variant_and_dtype(folder, torch_models, tmp_path):
    path = str(tmp_path / "fp16")
    shutil.copytree(folder, path)
    unet_dir = os.path.join(path, "unet")
    os.remove(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
    copy.deepcopy(torch_models[0]).half().save_pretrained(unet_dir, variant="fp16")
    got = load_pipeline_weights(path, dtype=jnp.bfloat16, variant="fp16")
    kernel = got.params["unet"]["conv_in"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    want = torch_models[0].conv_in.weight.detach().half().float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_allclose(np.asarray(kernel, np.float32), want, rtol=1e-2, atol=1e-3)


def _mutated_folder(folder, tmp_path, component, fn, weights="diffusion_pytorch_model.safetensors"):
    path = str(tmp_path / "mutated")
    shutil.copytree(folder, path)
    wpath = os.path.join(path, component, weights)
    sd = load_state_dict(wpath)
    save_state_dict(fn(sd), wpath)
    return path


def test_missing_keys(folder, tmp_path):
    path = _mutated_folder(folder, tmp_path, "unet",
                           lambda sd: {k: v for k, v in sd.items() if k != "conv_out.bias"})
    with pytest.raises(WeightsError, match="(?s)diffusion_pytorch_model.safetensors.*1 missing key.*conv_out.bias"):
        load_pipeline_weights(path)


def test_unexpected_keys(folder, tmp_path):
    path = _mutated_folder(folder, tmp_path, "vae", lambda sd: {**sd, "encoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match="1 unexpected key.*encoder.extra.weight"):
        load_pipeline_weights(path)


def test_shape_mismatch(folder, tmp_path):
    def cut(sd):  # transformers 4 writes "text_model.final_layer_norm.weight", 5 drops the prefix
        key = next(k for k in sd if k.endswith("final_layer_norm.weight"))
        sd[key] = sd[key][:16]
        return sd

    path = _mutated_folder(folder, tmp_path, "text_encoder", cut, weights="model.safetensors")
    with pytest.raises(WeightsError, match=r"shape mismatch.*final_layer_norm.weight: checkpoint \(16,\)"):
        load_pipeline_weights(path)


def test_unknown_pipeline_type(folder, tmp_path):
    path = str(tmp_path / "xl")
    shutil.copytree(folder, path)
    index = json.load(open(os.path.join(path, "model_index.json")))
    index["_class_name"] = "StableDiffusionXLPipeline"
    json.dump(index, open(os.path.join(path, "model_index.json"), "w"))
    with pytest.raises(WeightsError, match="unsupported pipeline 'StableDiffusionXLPipeline'"):
        load_pipeline_weights(path)


def test_unsupported_unet_config(folder, tmp_path):
    path = str(tmp_path / "odd")
    shutil.copytree(folder, path)
    cfg_path = os.path.join(path, "unet", "config.json")
    cfg = json.load(open(cfg_path))
    cfg["down_block_types"] = ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(WeightsError, match="unsupported unet config.*SimpleCrossAttnDownBlock2D"):
        load_pipeline_weights(path)


def test_bin_weights_need_allow_pickle(folder, torch_models, tmp_path):
    path = str(tmp_path / "bin")
    shutil.copytree(folder, path)
    vae_dir = os.path.join(path, "vae")
    os.remove(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
    torch.save(torch_models[1].state_dict(), os.path.join(vae_dir, "diffusion_pytorch_model.bin"))
    with pytest.raises(WeightsError, match="arbitrary code"):
        load_pipeline_weights(path)
    got = load_pipeline_weights(path, allow_pickle=True)
    np.testing.assert_array_equal(got.params["vae"]["decoder"]["conv_out"]["bias"],
                                  torch_models[1].decoder.conv_out.bias.detach().numpy())


def test_hub_id_offline_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(WeightsError, match="(?s)ldm-jax-tests/no-such-model.*could not be downloaded.*HF_HUB_OFFLINE"):
        load_pipeline_weights("ldm-jax-tests/no-such-model")
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor"):
        load_pipeline_weights("./no/such/folder")


# ------------------------------------------------------------------------------------- original single file
def _leaves_equal(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("ema", [False, True])
def test_single_file_v1(torch_models, loaded, tmp_path, ema):
    unet, vae, text = (_np_sd(m) for m in torch_models)
    if ema:  # the raw weights are something else: the loader must pick the EMA copies
        raw = {k: v + 1.0 for k, v in unet.items()}
        sd = diffusers_to_original(raw, vae, text, unet_config=UNET_CFG, vae_config=VAE_CFG, ema_unet=unet)
        assert ema_key("model.diffusion_model.out.2.weight") in sd
    else:
        sd = diffusers_to_original(unet, vae, text, unet_config=UNET_CFG, vae_config=VAE_CFG)
    sd["model_ema.decay"] = np.array(0.9999, np.float32)  # bookkeeping entries are ignored
    sd["alphas_cumprod"] = np.linspace(1, 0, 1000).astype(np.float32)
    path = tmp_path / "sd-v1-tiny.safetensors"
    save_state_dict(sd, path)
    got = load_single_file(path, **SINGLE_FILE_OVERRIDES)
    for name in ("unet", "vae", "text_encoder"):
        _leaves_equal(got.params[name], loaded.params[name])
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "use_linear_projection"):
        assert tuple(np.atleast_1d(got.config.unet[key])) == tuple(np.atleast_1d(loaded.config.unet[key])), key
    assert tuple(got.config.vae.block_out_channels) == (16, 32) and got.config.text_encoder.num_hidden_layers == 2
    assert got.config.scheduler.prediction_type == "epsilon"
    assert got.config.tokenizer == "openai/clip-vit-large-patch14"
    if ema:
        no_ema = load_single_file(path, use_ema=False, **SINGLE_FILE_OVERRIDES)
        np.testing.assert_array_equal(no_ema.params["unet"]["conv_out"]["bias"], unet["conv_out.bias"] + 1.0)


def test_single_file_v2_open_clip_pickled(torch_models, loaded, tmp_path):
    unet, vae, text = (_np_sd(m) for m in torch_models)
    sd = diffusers_to_original(unet, vae, text, unet_config=UNET_CFG, vae_config=VAE_CFG,
                               text_encoder_format="open_clip")
    # SD v2 ships OpenCLIP's last layer but conditions on the penultimate one: add an unused layer.
    rng = np.random.default_rng(0)
    for key in [k for k in sd if ".resblocks.1." in k]:
        sd[key.replace(".resblocks.1.", ".resblocks.2.")] = rng.standard_normal(sd[key].shape).astype(np.float32)
    sd["cond_stage_model.model.text_projection"] = np.zeros((32, 32), np.float32)
    path = tmp_path / "sd-v2-tiny.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, str(path))
    with pytest.raises(WeightsError, match="arbitrary code"):
        load_single_file(path)
    got = load_single_file(path, allow_pickle=True, **SINGLE_FILE_OVERRIDES)
    assert got.config.text_encoder.num_hidden_layers == 2 and got.config.text_encoder.hidden_act == "gelu"
    assert got.config.scheduler.prediction_type == "v_prediction"
    for name in ("unet", "vae", "text_encoder"):  # the last OpenCLIP layer dropped, q/k/v split
        _leaves_equal(got.params[name], loaded.params[name])
