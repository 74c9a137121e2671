"""Sampling from our own training workdirs: ``load_model(workdir)``, ``from_pretrained(workdir)``,
``ldm-jax sample/convert`` on a workdir; latest / chosen step, EMA / raw weights, clear errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.config_utils import load_config
from ldm_jax.convert import WeightsError, load_model
from ldm_jax.train.workdir import checkpoint_steps, is_training_workdir
from ldm_jax.models.tokenizer import PromptTokenizer
from ldm_jax.pipeline import StableDiffusionPipeline
from ldm_jax.runtime import enable_compilation_cache
from ldm_jax.tiny_tokenizer import write_tiny_clip_tokenizer
from ldm_jax.train import diffusion_task as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle in the top left"
CALL = dict(num_inference_steps=2, guidance_scale=7.5, seed=0, output_type="np")


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _fake_params(init, *args, seed):
    """Random params of ``init``'s shapes, drawn in numpy (no init compile): the 'pretrained' encoders."""
    shapes = jax.eval_shape(init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def make(path, s):
        name = str(path[-1])
        if "scale" in name:
            return (1 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        if "bias" in name:
            return (0.05 * rng.standard_normal(s.shape)).astype(np.float32)
        fan_in = max(int(np.prod(s.shape[:-1])), 1)
        return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    enable_compilation_cache()  # as the ldm-jax command does: a re-run skips the compiles
    root = tmp_path_factory.mktemp("workdir")
    c = load_config("tiny_train")
    c.train.update(dict(progress=False, tensorboard=False, preview_every=0, log_every=1, checkpoint_every=1,
                        keep_checkpoints=3, async_checkpoints=False, lr=1e-2, warmup_steps=0))
    c.stages = [dict(resolution=16, steps=3, batch_size=2)]
    c.mesh = dict(data=1, fsdp=2)  # sharded on 2 devices; sampling restores on the host, uses 8
    c.tokenizer = write_tiny_clip_tokenizer(str(root / "tok"))
    models = D.build_models(c)
    frozen = {"text": _fake_params(models.text_encoder.init, jnp.zeros((1, 77), jnp.int32), seed=1),
              "vae": _fake_params(models.vae.init, jnp.zeros((1, 16, 16, 3)), seed=2)}
    workdir = str(root / "run")
    state, _ = D.train(c, workdir, frozen=frozen, devices=jax.devices()[:2])
    ema, raw = jax.device_get((state.ema_params, state.params))
    return dict(config=c, workdir=workdir, frozen=frozen, ema=ema, raw=raw, root=root,
                tokenizer=PromptTokenizer.from_pretrained(c.tokenizer))


def _direct(run, unet):
    params = {"unet": unet, "vae": run["frozen"]["vae"], "text_encoder": run["frozen"]["text"]}
    return StableDiffusionPipeline(run["config"], params, run["tokenizer"])


def test_trainer_writes_a_model_source(run):
    wd = run["workdir"]
    assert is_training_workdir(wd)
    assert checkpoint_steps(wd) == [1, 2, 3]
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["unet"]["block_out_channels"] == [32, 64]
    assert sorted(os.listdir(os.path.join(wd, "frozen"))) == ["text_encoder.safetensors", "vae.safetensors"]
    assert os.path.isfile(os.path.join(wd, "tokenizer", "vocab.json"))


def test_load_model_latest_step_ema_and_raw(run):
    wd = run["workdir"]
    m = load_model(wd)
    assert m.config.checkpoint.step == 3 and m.config.checkpoint.ema
    for got, want in ((m.params["unet"], run["ema"]), (m.params["vae"], run["frozen"]["vae"]),
                      (m.params["text_encoder"], run["frozen"]["text"])):
        g, w = _flat(got), _flat(want)
        assert g.keys() == w.keys()
        for k in g:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    r = _flat(load_model(wd, ema=False).params["unet"])
    for k, v in _flat(run["raw"]).items():
        np.testing.assert_array_equal(r[k], v, err_msg=k)
    two = _flat(load_model(wd, step=2).params["unet"])
    assert any(not np.array_equal(two[k], v) for k, v in _flat(run["ema"]).items())  # an older checkpoint


@pytest.fixture(scope="module")
def workdir_images(run):
    """Images of the pipeline loaded from the workdir (latest checkpoint, EMA weights)."""
    return StableDiffusionPipeline.from_pretrained(run["workdir"])(PROMPT, **CALL)


def test_pipeline_from_workdir_equals_in_memory_params(run, workdir_images):
    wd = run["workdir"]
    got = workdir_images
    want = _direct(run, run["ema"])(PROMPT, **CALL)
    np.testing.assert_array_equal(got, want)
    assert want.std() > 0.01  # not flat images
    got_raw = StableDiffusionPipeline.from_pretrained(wd, ema=False)(PROMPT, **CALL)
    want_raw = _direct(run, run["raw"])(PROMPT, **CALL)
    np.testing.assert_array_equal(got_raw, want_raw)
    assert np.abs(got_raw - got).max() > 0  # EMA and raw weights really differ


def test_cli_convert_workdir_and_sample(run, workdir_images, tmp_path):
    from PIL import Image

    from ldm_jax.cli import main

    out = str(tmp_path / "diffusers")
    main(["convert", run["workdir"], out])
    assert os.path.isfile(os.path.join(out, "model_index.json"))
    assert os.path.isfile(os.path.join(out, "tokenizer", "vocab.json"))
    got = StableDiffusionPipeline.from_pretrained(out)(PROMPT, **CALL)
    np.testing.assert_allclose(got, workdir_images, rtol=0, atol=1e-6)

    main(["sample", "--model", run["workdir"], "--prompt", PROMPT, "--steps", "2", "--step", "2",
          "--no-ema", "--out", str(tmp_path / "png")])
    assert Image.open(tmp_path / "png" / "000_00.png").size == (16, 16)


def _copy(run, name):
    dst = str(run["root"] / name)
    shutil.copytree(run["workdir"], dst)
    return dst


def test_missing_step_and_no_complete_checkpoint(run):
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint of step 7; complete checkpoints: \[1, 2, 3\]"):
        load_model(run["workdir"], step=7)
    empty = _copy(run, "crashed_first_save")
    for step in os.listdir(os.path.join(empty, "checkpoints")):
        shutil.rmtree(os.path.join(empty, "checkpoints", step))
    os.makedirs(os.path.join(empty, "checkpoints", "1.orbax-checkpoint-tmp-1700000000"))  # an unfinished save
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        StableDiffusionPipeline.from_pretrained(empty)


def test_corrupt_checkpoint_is_a_clear_error_and_the_default_falls_back(run, caplog):
    wd = _copy(run, "corrupt")
    state = os.path.join(wd, "checkpoints", "3", "state")
    for dirpath, _, files in os.walk(state):
        for f in files:
            if dirpath.endswith(os.sep + "d"):  # the OCDBT data files
                open(os.path.join(dirpath, f), "wb").close()
    with pytest.raises(WeightsError, match="checkpoint of step 3 .* cannot be read") as err:
        load_model(wd, step=3)
    assert "\n" not in str(err.value)
    with caplog.at_level("WARNING"):  # the latest by default: the newest one that reads, saying which it skipped
        fallback = load_model(wd)
    assert "checkpoint of step 3" in caplog.text and "using the one before it" in caplog.text
    older = load_model(wd, step=2)
    for a, b in zip(jax.tree.leaves(fallback.params["unet"]), jax.tree.leaves(older.params["unet"])):
        np.testing.assert_array_equal(a, b)


def test_missing_pieces_are_clear_errors(run, tmp_path):
    wd = _copy(run, "no_frozen")
    os.remove(os.path.join(wd, "frozen", "vae.safetensors"))
    with pytest.raises(WeightsError, match="no frozen vae params"):
        load_model(wd)
    os.remove(os.path.join(wd, "config.json"))
    with pytest.raises(WeightsError, match="no config.json"):
        load_model(wd)

    wd = _copy(run, "no_tokenizer")
    shutil.rmtree(os.path.join(wd, "tokenizer"))
    with open(os.path.join(wd, "config.json")) as f:
        cfg = json.load(f)
    cfg["tokenizer"] = None
    with open(os.path.join(wd, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="names no tokenizer"):
        StableDiffusionPipeline.from_pretrained(wd)
    with pytest.raises(ValueError, match="not a training workdir"):
        load_model(str(tmp_path), step=3)
