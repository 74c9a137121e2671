"""LoRA training through the one training loop: only adapters train (and sit in the optimizer state),
the workdir is a model source with the adapters merged, its export loads in diffusers, and the LoRA
step needs far less memory than the full fine-tune of the same model."""
import jax
import numpy as np
import pytest

from ldm_jax.config_utils import load_config
from ldm_jax.convert.loading import load_model
from ldm_jax.models import lora as L
from ldm_jax.train import diffusion_task as D
from ldm_jax.train import loop, sharding

FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from ldm_jax.reference import write_reference_folder

    return write_reference_folder(str(tmp_path_factory.mktemp("base") / "model"), "v1", seed=0)


def _config(folder, **lora):
    c = load_config("tiny_lora", [f"--config.init.pretrained={folder}"])
    c.stages = [dict(resolution=16, steps=12, batch_size=8)]
    c.train.update(dict(progress=False, tensorboard=False, log_every=1, checkpoint_every=6, compiler_options=FAST))
    c.lora.update(lora)
    c.mesh = dict(data=2, fsdp=2)
    return c


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    c = _config(folder, text_targets=L.TEXT_ATTENTION, dropout=0.1)
    work = str(tmp_path_factory.mktemp("lora_run"))
    state, hist = D.train(c, work, devices=jax.devices()[:4])
    return c, work, state, hist


def test_only_the_adapters_train_and_the_optimizer_holds_only_them(run, folder):
    c, work, state, hist = run
    assert set(state.params) == {"unet", "text_encoder"}
    n_unet, n_text = (len(L.adapter_layers(state.params[k])) for k in ("unet", "text_encoder"))
    assert (n_unet, n_text) == (32, 8)  # 4 transformers x (attn1 + attn2) x 4 projections; 2 CLIP layers x 4
    adapter_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(state.params))
    moments = [tuple(x.shape) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sorted(moments) == sorted(adapter_shapes * 2)  # AdamW's mu and nu of the adapters, nothing else
    for k in ("unet", "text_encoder"):  # the up projections start at 0 and moved: gradients reached both
        ups = [np.abs(np.asarray(a["up"])).max() for a in L.adapter_layers(state.params[k]).values()]
        assert min(ups) > 0, k
    assert all(np.isfinite(h["loss"]) for h in hist) and int(state.step) == 12


def test_the_workdir_samples_with_the_adapters_merged_and_exports_a_diffusers_lora(run, folder, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline as TorchPipeline

    from ldm_jax.cli import main
    from ldm_jax.models.unet import unet_from_config

    c, work, state, _ = run
    base = load_model(folder)
    merged = load_model(work)  # EMA adapters merged into the frozen base
    scale = c.lora.alpha / c.lora.rank
    ema = jax.tree.map(np.asarray, state.ema_params)
    want_unet = L.merge(base.params["unet"], [(ema["unet"], scale)])
    for a, b in zip(jax.tree.leaves(want_unet), jax.tree.leaves(merged.params["unet"])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    want_text = L.merge(base.params["text_encoder"], [(ema["text_encoder"], scale)])
    for a, b in zip(jax.tree.leaves(want_text), jax.tree.leaves(merged.params["text_encoder"])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    main(["convert", work, str(tmp_path / "export"), "--adapter"])
    pipe = TorchPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "export"))
    pipe.unet.eval()  # peft adds the adapters' Dropout (lora_dropout 0.1 from the metadata) in training mode
    rng = np.random.RandomState(0)
    x, t, ctx = rng.randn(2, 8, 8, 4).astype(np.float32), np.array([5, 700]), rng.randn(2, 7, 32).astype(np.float32)
    with torch.no_grad():
        want = pipe.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                         torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
    unet = unet_from_config(dict(base.config.unet))
    np.testing.assert_allclose(np.asarray(unet.apply({"params": merged.params["unet"]}, x, t, ctx)), want, atol=1e-4)
    full = tmp_path / "full"  # a full fine-tune's workdir: what its config.json says is enough
    full.mkdir()
    (full / "config.json").write_text('{"train": {"trainable": "unet"}}')
    from ldm_jax.train.workdir import export_adapter

    with pytest.raises(ValueError, match="trained the whole UNet"):
        export_adapter(str(full), str(tmp_path / "x"))


def _step_memory(config):
    task = D.DiffusionTask(config)
    mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
    p = loop.programs(task, mesh)
    spec = task.batch_spec(task.stages()[0])
    m = p.step_fn.lower(p.abstract_state, spec, p.abstract_aux).compile().memory_analysis()
    held = m.argument_size_in_bytes  # the state (params, EMA, AdamW moments) and the frozen models
    return held, held + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def test_the_lora_step_needs_far_less_memory_than_the_full_fine_tune(folder):
    """Compiled memory of one step on the same model and batch (2 rows: the weights' share, not the
    activations', is what LoRA changes)."""
    lora = _config(folder)
    full = _config(folder)
    full.train.trainable = "unet"
    for c in (lora, full):
        c.stages = [dict(resolution=16, steps=1, batch_size=2)]
    (full_held, full_total), (lora_held, lora_total) = _step_memory(full), _step_memory(lora)
    print(f"train step memory: full fine-tune {full_held / 2**20:.2f} MiB held, {full_total / 2**20:.2f} MiB in all; "
          f"LoRA {lora_held / 2**20:.2f} / {lora_total / 2**20:.2f} MiB")
    assert lora_held < 0.35 * full_held, (lora_held, full_held)
    assert lora_total < 0.6 * full_total, (lora_total, full_total)


def test_bad_lora_settings_are_clear_errors(folder, tmp_path):
    for key, value, match in (("rank", 0, "rank must be an integer >= 1"), ("dropout", 1.0, "dropout must be in"),
                              ("base_dtype", "int8", "base_dtype must be one of"),
                              ("unet_targets", "no_such_layer", "match no linear layer")):
        c = _config(folder, **{key: value})
        with pytest.raises(ValueError, match=match):
            D.train(c, str(tmp_path / key), devices=jax.devices()[:4])
    c = _config(folder)
    c.init.unet = "random"
    with pytest.raises(ValueError, match="init.unet='pretrained'"):
        D.train(c, str(tmp_path / "random"), devices=jax.devices()[:4])
    c = _config(folder)
    c.train.trainable = "everything"
    with pytest.raises(ValueError, match="trainable must be one of"):
        D.train(c, str(tmp_path / "bad"), devices=jax.devices()[:4])


def test_a_lora_run_stopped_by_sigterm_resumes_bit_identical(run, folder, tmp_path):
    """The fixture's run (text adapters, adapter dropout), stopped after step 3 and resumed: the same
    adapters, EMA and optimizer state, bit for bit."""
    from signals import SigtermAt

    _, _, full, full_hist = run
    c = _config(folder, text_targets=L.TEXT_ATTENTION, dropout=0.1)
    c.train.prefetch = 1  # the signal is keyed to reading a batch: no read-ahead

    def source_fn(config, stage, rows):
        return SigtermAt(D.make_batch_source(config, stage, rows), at={2})

    work = str(tmp_path / "split")
    first = D.train(c, work, devices=jax.devices()[:4], batch_source_fn=source_fn)
    assert first.stopped_by is not None and int(first.state.step) == 3
    state, hist = D.train(c, work, devices=jax.devices()[:4], batch_source_fn=source_fn)
    assert int(state.step) == 12
    assert [h["loss"] for h in first.history + hist] == [h["loss"] for h in full_hist]
    for a, b in zip(jax.tree.leaves((full.params, full.ema_params, full.opt_state)),
                    jax.tree.leaves((state.params, state.ema_params, state.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
