"""Diffusion training: sharded == single device, text dropout, skipped non-finite steps, learning.

Two processes == one, exact resume across a stage change and SIGKILL mid-save: test_train_resume.py.
The 3-step sharded/single-device runs compile with XLA optimisation level 0
(``train.compiler_options``): faster to build on CPU, and compiling dominates them; the 300-step
learning run keeps the default level (its steps dominate).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.config_utils import load_config
from ldm_jax.train import diffusion_task as D
from ldm_jax.train import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _config(**train):
    c = load_config("tiny_train")
    c.train.update(dict(progress=False, tensorboard=False, preview_every=0, log_every=1, **train))
    return c


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------------------------
# Sharded (data=2, fsdp=4) == one device


def _sharded_config():
    c = _config(compiler_options=FAST_COMPILE)  # 3 steps: compiling dominates
    c.stages = [dict(resolution=16, steps=3, batch_size=8)]  # images through the frozen VAE
    c.train.text_dropout = 0.5
    return c


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    runs = {}
    for name, mesh, devices in (("sharded", dict(data=2, fsdp=4), None),
                                ("single", dict(data=1), jax.devices()[:1])):
        c = _sharded_config()
        c.mesh = dict(mesh)
        state, hist = D.train(c, str(tmp_path_factory.mktemp(name)), devices=devices)
        runs[name] = (state, [h["loss"] for h in hist])
    return runs


def test_sharded_matches_single_device(sharded_runs):
    s8, l8 = sharded_runs["sharded"]
    s1, l1 = sharded_runs["single"]
    assert len(l8) == len(l1) == 3
    np.testing.assert_allclose(l8, l1, rtol=0, atol=1e-5)
    specs = {str(p.sharding.spec) for p in jax.tree.leaves(s8.params)}
    assert any("fsdp" in s for s in specs), specs  # FSDP really shards parameters
    shard_shapes = [p.addressable_shards[0].data.shape != p.shape for p in jax.tree.leaves(s8.opt_state)
                    if hasattr(p, "addressable_shards") and p.ndim]
    assert any(shard_shapes)
    f8, f1 = _flat((s8.params, s8.ema_params)), _flat((s1.params, s1.ema_params))
    err = max(float(np.max(np.abs(f8[k] - f1[k]))) for k in f8)
    assert err <= 1e-5, err
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(_flat(s1.params)),
                                                            jax.tree.leaves(_flat(s1.ema_params))))
    assert moved > 0  # training did change the weights


@pytest.fixture(scope="module")
def text_model():
    c = _config()
    models = D.build_models(c)
    ids = jnp.zeros((1, 77), jnp.int32)
    params = models.text_encoder.init(jax.random.PRNGKey(1), ids)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    return c, models.text_encoder, params


def test_text_dropout_rate():
    ids = jnp.arange(64 * 77, dtype=jnp.int32).reshape(64, 77) % 500
    empty = jnp.asarray(D.empty_prompt_ids(_config()))
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    out, dropped = jax.vmap(lambda k: D.text_dropout(k, ids, empty, 0.1))(keys)
    rate = float(jnp.mean(dropped))
    assert abs(rate - 0.10) <= 0.02, rate
    d = np.asarray(dropped)
    np.testing.assert_array_equal(np.asarray(out)[d], np.broadcast_to(np.asarray(empty), (d.sum(), 77)))
    np.testing.assert_array_equal(np.asarray(out)[~d], np.broadcast_to(np.asarray(ids), out.shape)[~d])


def test_dropped_rows_get_the_empty_prompt_embedding(text_model):
    c, enc, params = text_model
    empty = jnp.asarray(D.empty_prompt_ids(c))
    assert empty[0] == c.text_encoder.vocab_size - 2 and empty[1] == c.text_encoder.vocab_size - 1
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 997, (16, 77)), jnp.int32)
    ctx, dropped = jax.jit(D.encode_conditioning, static_argnums=(0, 5))(enc, params, jax.random.PRNGKey(3),
                                                                         ids, empty, 0.5)
    dropped = np.asarray(dropped)
    assert 0 < dropped.sum() < 16
    uncond = enc.apply({"params": params}, jnp.broadcast_to(empty, ids.shape)).context
    cond = enc.apply({"params": params}, ids).context
    np.testing.assert_allclose(np.asarray(ctx)[dropped], np.asarray(uncond)[dropped], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ctx)[~dropped], np.asarray(cond)[~dropped], rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(uncond[0] - cond[0]))) > 1e-2  # the two branches really differ


# ----------------------------------------------------------------------------------------------
# Learning; non-finite steps are skipped


@pytest.fixture(scope="module")
def learned():
    c = _config(lr=2e-3, warmup_steps=20, text_dropout=0.1)
    c.data.source = "synthetic_latents"
    c.stages = [dict(resolution=8, steps=300, batch_size=16)]
    c.mesh = dict(data=1)
    ts = D.setup(c, sharding.make_mesh(c.mesh, jax.devices()[:1]))
    src = D.make_batch_source(c, D.get_stages(c)[0], (0, 16))
    state, losses = ts.state, []
    for _ in range(300):
        state, m = ts.step_fn(state, sharding.make_global_batch(ts.mesh, next(src), 16), ts.aux)
        losses.append(m["loss"])
    return ts, state, np.asarray(jax.device_get(losses)), src


def test_learning_reduces_loss(learned):
    _, state, losses, _ = learned
    start, end = losses[:20].mean(), losses[-50:].mean()
    assert np.all(np.isfinite(losses)) and int(state.skipped_steps) == 0
    assert end < 0.5 * start, (start, end)


def test_non_finite_step_is_skipped(learned):
    ts, state, _, src = learned
    batch = next(src)
    batch["latents"] = batch["latents"].copy()
    batch["latents"][0, 0, 0, 0] = np.nan
    before = _flat((state.params, state.ema_params, state.opt_state))
    # a copy: the step donates its state, and later tests read the fixture's
    new, m = ts.step_fn(jax.tree.map(jnp.copy, state), sharding.make_global_batch(ts.mesh, batch, 16), ts.aux)
    assert int(m["skipped"]) == 1 and int(new.skipped_steps) == 1 and int(new.step) == 301
    after = _flat((new.params, new.ema_params, new.opt_state))
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_preview_sampler_pairs_each_prompt_with_the_empty_prompt(learned):
    """make_sampler (the EMA preview grids) runs the UNet on (empty prompt, prompt) context pairs:
    at guidance 0 only the empty prompt's branch counts, so different prompts give the same images;
    at guidance 5 the images follow the prompt."""
    ts, state, _, src = learned
    c = _config()
    ids = np.asarray(next(src)["input_ids"])
    other = next(i for i in range(len(ids)) if (ids[i] != ids[0]).any())
    a, b = ids[[0, 0]], ids[[other, 0]]
    key, shape = jax.random.key(3), (8, 8, c.unet.in_channels)
    unguided = jax.jit(D.make_sampler(c, ts.task.models, num_steps=5, guidance_scale=0.0), static_argnums=4)
    guided = jax.jit(D.make_sampler(c, ts.task.models, num_steps=5, guidance_scale=5.0), static_argnums=4)
    u_a, u_b = (np.asarray(unguided(state.ema_params, ts.aux, key, i, shape)) for i in (a, b))
    g_a, g_b = (np.asarray(guided(state.ema_params, ts.aux, key, i, shape)) for i in (a, b))
    assert u_a.shape == g_a.shape == (2, 8, 8, 3) and np.isfinite(g_a).all()
    np.testing.assert_allclose(u_a, u_b, atol=1e-5, rtol=0)
    assert np.abs(g_a[0] - g_b[0]).max() > 1e-2  # the first prompts differ
    np.testing.assert_allclose(g_a[1], g_b[1], atol=1e-5, rtol=0)  # the second ones do not


def test_given_networks_are_not_drawn():
    """Networks whose weights a run replaces (pretrained ones) start as zeros of the random init's
    shapes and dtypes, so the jitted init builds no random initializer for them; the others are drawn."""
    import optax

    c = _config()
    models = D.build_models(c)
    args = (c, models, jax.random.key(0), (1, 8, 8, 4), optax.adam(1e-3), (1, 16, 16, 3))
    drawn_state, drawn = D.create_train_state(*args)
    given_state, given = D.create_train_state(*args, given=frozenset({"unet", "vae"}))
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
    assert shapes(given_state.params) == shapes(drawn_state.params) and shapes(given) == shapes(drawn)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves((given_state.params, given["vae"])))
    # not given: drawn from the same key as before
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(given["text"]), jax.tree.leaves(drawn["text"])))
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(drawn_state.params))
