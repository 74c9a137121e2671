"""The autoencoder task (real AutoencoderKL / VQModel, grain pipeline over shapes_captions) in the one
training loop: PatchGAN parity, hinge loss, adaptive weight, disc start, LPIPS and KL terms,
learning, exact resume, the VQ variant through the CLI.

Kept fast by compiling each configuration once: every run of one config shares the jitted init and
step (the training loop caches them), and the configs compile with XLA optimisation level 0.
The LPIPS path runs on a batch of 2 on one device (XLA's CPU convs at VGG16's 2x2x512 layers are
slow); the learning/resume and VQ runs turn LPIPS off.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch import nn as tnn

from ldm_jax.config_utils import apply_overrides, load_config
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import LPIPS
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import sharding
from ldm_jax.train import autoencoder_task as vt

FAST_COMPILE = {"xla_backend_optimization_level": 0}
KL_WEIGHT = 0.1  # large enough that the KL term is visible in the checks below


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


def _config(data_dir, variant=None, **loss):
    c = load_config("tiny_autoencoder" + (f":{variant}" if variant else ""))
    c.loss.update(loss)
    c.train.update(dict(progress=False, tensorboard=False, preview_every=0, log_every=10, checkpoint_every=1000,
                        compiler_options=FAST_COMPILE))
    c.data.update(dict(data_dir=data_dir, num_train=64, num_validation=8, num_heldout=8))
    return c


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(_host(tree))}


# --------------------------------------------------------------------------------------- pieces
def test_hinge_and_vanilla_loss_vs_numpy():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(4, 5, 5, 1)), rng.normal(size=(4, 5, 5, 1))
    want = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    np.testing.assert_allclose(float(vt.hinge_d_loss(jnp.asarray(real), jnp.asarray(fake))), want, rtol=1e-6)
    want_v = 0.5 * (np.mean(np.log1p(np.exp(-real))) + np.mean(np.log1p(np.exp(fake))))
    np.testing.assert_allclose(float(vt.vanilla_d_loss(jnp.asarray(real), jnp.asarray(fake))), want_v, rtol=1e-6)


def _torch_nlayer(input_nc=3, ndf=8, n_layers=2):
    """taming-transformers NLayerDiscriminator with BatchNorm (use_bias False in the middle)."""
    seq = [tnn.Conv2d(input_nc, ndf, 4, 2, 1), tnn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        seq += [tnn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False), tnn.BatchNorm2d(ndf * mult),
                tnn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2**n_layers, 8)
    seq += [tnn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False), tnn.BatchNorm2d(ndf * mult),
            tnn.LeakyReLU(0.2, True), tnn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    m = tnn.Module()
    m.main = tnn.Sequential(*seq)
    m.forward = lambda x: m.main(x)
    return m


@pytest.mark.parametrize("n_layers", [2, 3])
def test_discriminator_matches_taming(n_layers):
    from ldm_jax.convert.torch_flax import torch_to_flax

    torch.manual_seed(0)
    ref = _torch_nlayer(ndf=8, n_layers=n_layers)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
        for mod in ref.modules():
            if isinstance(mod, tnn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    ours = NLayerDiscriminator(ndf=8, n_layers=n_layers)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
    shapes = jax.eval_shape(lambda: ours.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = torch_to_flax({k: v for k, v in sd.items() if "running" not in k and "num_batches" not in k},
                           shapes["params"])
    stats = {k.split(".")[0] + "_" + k.split(".")[1]: {} for k in sd if "running_mean" in k}
    for k in sd:
        if "running_" in k:
            a, i, leaf = k.split(".")
            stats[f"{a}_{i}"]["mean" if leaf == "running_mean" else "var"] = jnp.asarray(sd[k])
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # one compile instead of op by op
    def run(params, stats, xj):
        v = {"params": params, "batch_stats": stats}
        outs = [ours.apply(v, xj, train=train, mutable=["batch_stats"])[0] for train in (False, True)]
        return outs, ours.init(jax.random.PRNGKey(1), xj, train=False)["params"]

    outs, init = run(params, stats, xj)
    for train, got in zip((False, True), outs):
        ref.train(train)
        with torch.no_grad():
            want = ref.forward(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
        assert got.shape == want.shape == (4, 32 // 2**n_layers - 2, 32 // 2**n_layers - 2, 1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)
    # taming init: conv N(0, 0.02), BatchNorm scale N(1, 0.02)
    assert abs(float(jnp.std(init["main_2"]["kernel"])) - 0.02) < 0.003
    assert abs(float(jnp.mean(init["main_3"]["scale"])) - 1.0) < 0.01


def test_edge_loss_vs_numpy_and_in_the_step(data_dir):
    """``loss.edge_weight``: the per-pixel error of the images' finite differences (numpy reference),
    zero for a perfect or uniformly shifted-in-value reconstruction, added to the pixel term of the nll
    the step reports."""
    rng = np.random.default_rng(0)
    x, r = rng.uniform(-1, 1, (2, 5, 6, 3)).astype(np.float32), rng.uniform(-1, 1, (2, 5, 6, 3)).astype(np.float32)
    want = np.zeros_like(x)
    dx = lambda a: a[:, :, 1:] - a[:, :, :-1]  # noqa: E731
    dy = lambda a: a[:, 1:] - a[:, :-1]  # noqa: E731
    want[:, :, :-1] += (dx(x) - dx(r)) ** 2
    want[:, :-1] += (dy(x) - dy(r)) ** 2
    np.testing.assert_allclose(np.asarray(vt.edge_loss(jnp.asarray(x), jnp.asarray(r))), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vt.edge_loss(jnp.asarray(x), jnp.asarray(x + 0.3), jnp.abs)), 0, atol=1e-6)

    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    nll = {}
    for w in (0.0, 2.0):
        config = _config(data_dir, perceptual_weight=0.0, pixel_loss="l2", edge_weight=w, disc_start=10 ** 9)
        config.train.batch_size = 2
        ts = vt.setup(config, mesh)
        images = next(vt.make_data_iterator(config, data_dir))["image"]
        batch = sharding.make_global_batch(mesh, {"image": images}, 2)
        state = ts.state
        key = jax.random.fold_in(state.rng, state.step)
        rec = ts.task.model.apply({"params": _host(state.params["ae"])}, jnp.asarray(images), key=key,
                                  sample_posterior=True)[0]
        _, m = ts.step_fn(state, batch, ts.aux)
        nll[w] = float(m["nll_loss"])
        extra = float(jnp.sum(vt.edge_loss(jnp.asarray(images), rec))) / 2  # logvar 0: nll = sum(rec) / B
    assert extra > 0
    np.testing.assert_allclose(nll[2.0] - nll[0.0], 2.0 * extra, rtol=1e-3)


def test_scale_equivariance_term_and_its_update(data_dir):
    """``loss.scale_equivariance_weight``: the step adds the pixel + edge loss of decode(pool2(z))
    against pool2(x) (z: the posterior sample the reconstruction decodes) and its update is the
    optimizer's step on the gradient of that whole objective, written out here independently."""
    a = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    want = a.reshape(2, 2, 2, 3, 2, 3).mean((2, 4))
    np.testing.assert_allclose(np.asarray(vt.pool2(jnp.asarray(a))), want)
    with pytest.raises(ValueError, match="not even"):
        vt.pool2(jnp.zeros((1, 3, 4, 1)))

    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    w, kl_w = 0.7, KL_WEIGHT
    config = _config(data_dir, perceptual_weight=0.0, pixel_loss="l2", edge_weight=2.0, kl_weight=kl_w,
                     disc_start=10 ** 9, scale_equivariance_weight=w)
    config.train.batch_size = 2
    ts = vt.setup(config, mesh)
    model = ts.task.model
    images = next(vt.make_data_iterator(config, data_dir))["image"]
    batch = sharding.make_global_batch(mesh, {"image": images}, 2)
    state = ts.state
    before = _host(state)
    key = jax.random.fold_in(state.rng, state.step)
    x = jnp.asarray(images)

    def objective(ae):
        post = model.apply({"params": ae}, x, method=model.encode)
        z = post.sample(key)
        rec = model.apply({"params": ae}, z, method=model.decode)
        zs = z.reshape(2, z.shape[1] // 2, 2, z.shape[2] // 2, 2, -1).mean((2, 4))
        xs = x.reshape(2, x.shape[1] // 2, 2, x.shape[2] // 2, 2, 3).mean((2, 4))
        small = model.apply({"params": ae}, zs, method=model.decode)
        nll = jnp.sum((x - rec) ** 2 + 2.0 * vt.edge_loss(x, rec)) / 2
        se = jnp.sum((xs - small) ** 2 + 2.0 * vt.edge_loss(xs, small)) / 2
        return nll + kl_w * jnp.sum(post.kl()) / 2 + w * se, se

    (want_loss, want_se), g = jax.value_and_grad(objective, has_aux=True)(before.params["ae"])
    new_state, m = ts.step_fn(state, batch, ts.aux)
    np.testing.assert_allclose(float(m["se_loss"]), float(want_se), rtol=1e-4)
    np.testing.assert_allclose(float(m["loss"]), float(want_loss), rtol=1e-4)
    assert float(m["se_loss"]) > 0
    gen_tx, _ = vt.make_optimizers(config)
    grads = {"ae": g, "logvar": jnp.zeros_like(before.params["logvar"])}
    upd, _ = gen_tx.update(grads, before.opt_state, before.params)
    want_params = _flat(optax.apply_updates(before.params, upd))
    got = _flat(new_state.params)
    for k in want_params:
        if "to_k']['bias" in k:  # softmax ignores a key bias: its gradient is rounding noise, which Adam scales up
            continue
        np.testing.assert_allclose(got[k], want_params[k], rtol=2e-3, atol=2e-6, err_msg=k)
    assert not _same(got, _flat(before.params))

    with pytest.raises(ValueError, match=">= 0"):
        vt.make_train_step(_config(data_dir, scale_equivariance_weight=-1.0), model)
    with pytest.raises(ValueError, match="kind='kl'"):
        vt.make_train_step(_config(data_dir, scale_equivariance_weight=1.0), model,
                           forward=vt.make_forward(model, "kl"))


def test_latent_noise_decodes_noisy_latents(data_dir):
    """``loss.latent_noise``: the decoder reads z + t * std(z) * n (t ~ U(0, max) per example, std of the
    batch, gradient stopped) and the step's loss is that of the noisy reconstruction, written out here."""
    z = jax.random.normal(jax.random.PRNGKey(3), (512, 4, 4, 4)) * 3.0 + 1.0
    noisy = vt.noisy_latents(z, jax.random.PRNGKey(4), 0.5)
    t = np.asarray(jnp.std(noisy - z, axis=(1, 2, 3)) / jnp.std(z))  # each example's noise level
    assert t.max() < 0.5 * 1.3 and t.min() < 0.05 and abs(t.mean() - 0.25) < 0.025
    grad = jax.grad(lambda a: vt.noisy_latents(a, jax.random.PRNGKey(4), 0.5).sum())(z)
    np.testing.assert_allclose(np.asarray(grad), 1.0, rtol=1e-6)  # std(z) is a constant to the gradient

    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    config = _config(data_dir, perceptual_weight=0.0, pixel_loss="l2", edge_weight=0.0, kl_weight=0.0,
                     disc_start=10 ** 9, latent_noise=0.5)
    config.train.batch_size = 2
    ts = vt.setup(config, mesh)
    model = ts.task.model
    images = next(vt.make_data_iterator(config, data_dir))["image"]
    batch = sharding.make_global_batch(mesh, {"image": images}, 2)
    key = jax.random.fold_in(ts.state.rng, ts.state.step)
    x, ae = jnp.asarray(images), _host(ts.state).params["ae"]
    k_post, k_noise = jax.random.split(key)
    post = model.apply({"params": ae}, x, method=model.encode)
    z = post.sample(k_post)

    def loss(z):
        rec = model.apply({"params": ae}, z, method=model.decode)
        return float(jnp.sum((x - rec) ** 2) / 2)

    _, m = ts.step_fn(ts.state, batch, ts.aux)
    np.testing.assert_allclose(float(m["loss"]), loss(vt.noisy_latents(z, k_noise, 0.5)), rtol=1e-4)
    assert abs(float(m["loss"]) - loss(z)) > 1e-3 * loss(z)  # the noise reached the decoder
    # with the scale-equivariance term too: the reconstruction decodes the noisy latents, the pooled
    # decode the clean ones
    rec, _, small = vt.make_scale_equivariant_forward(model, 0.5)(ae, x, key)
    decode = lambda a: np.asarray(model.apply({"params": ae}, a, method=model.decode))
    np.testing.assert_allclose(np.asarray(rec), decode(vt.noisy_latents(z, k_noise, 0.5)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(small), decode(vt.pool2(z)), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match=">= 0"):
        vt.make_forward(model, "kl", -0.1)
    with pytest.raises(ValueError, match="kind='kl'"):
        vt.make_forward(model, "vq", 0.5)


def test_frozen_modules_stay_as_they_are(data_dir):
    """``optim.frozen``: a decoder fine-tune (encoder and quant_conv frozen) changes the decoder only, so
    the latent space stays what it was; an unknown module name is a one-line error."""
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    config = _config(data_dir, perceptual_weight=0.0, kl_weight=KL_WEIGHT, disc_start=10 ** 9)
    config.optim.frozen = ("encoder", "quant_conv")
    config.train.batch_size = 2
    ts = vt.setup(config, mesh)
    images = next(vt.make_data_iterator(config, data_dir))["image"]
    batch = sharding.make_global_batch(mesh, {"image": images}, 2)
    before = _host(ts.state.params["ae"])
    after = _host(ts.step_fn(ts.state, batch, ts.aux)[0].params["ae"])
    assert set(before) >= {"encoder", "quant_conv", "decoder", "post_quant_conv"}
    for name in before:
        assert _same(before[name], after[name]) == (name in ("encoder", "quant_conv")), name

    config.optim.frozen = ("encoder", "quant")
    with pytest.raises(ValueError, match=r"optim.frozen names \['quant'\]"):
        vt.make_optimizers(config)[0].init(ts.state.params)


# ------------------------------------------ KL + LPIPS + PatchGAN: one device, batch 2, disc_start 2
@pytest.fixture(scope="module")
def kl_steps(data_dir):
    """Real AutoencoderKL, LPIPS on (random VGG), kl_weight 0.1, disc_start 2: three steps from
    init (host copies of the states before/after each, and the metrics) on a pipeline batch."""
    config = _config(data_dir, disc_start=2, perceptual_weight=1.0, kl_weight=KL_WEIGHT)
    config.train.batch_size = 2
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    ts = vt.setup(config, mesh)
    assert isinstance(ts.task.model, AutoencoderKL)
    images = next(vt.make_data_iterator(config, data_dir))["image"]
    assert images.shape == (2, 16, 16, 3) and images.min() >= -1 and images.max() <= 1
    batch = sharding.make_global_batch(mesh, {"image": images}, 2)
    state, states, metrics = ts.state, [], []
    lpips0 = _host(ts.aux["lpips"])
    assert jax.tree.leaves(lpips0)  # LPIPS on: a (random) VGG in the aux
    for _ in range(3):
        states.append(_host(state))
        state, m = ts.step_fn(state, batch, ts.aux)  # donates state, not the frozen aux
        metrics.append(_host(m))
    states.append(_host(state))
    assert _same(_host(ts.aux["lpips"]), lpips0)  # LPIPS is frozen
    return config, ts.task.model, jnp.asarray(images), states, metrics, lpips0


def test_no_discriminator_before_disc_start(kl_steps):
    config, _, _, states, metrics, _ = kl_steps
    s0 = states[0]
    for m in metrics[:2]:  # steps 0 and 1 < disc_start
        assert float(m["disc_factor"]) == 0.0 and float(m["disc_loss"]) == 0.0 and float(m["g_loss"]) == 0.0
        assert float(m["d_weight"]) == 0.0
        np.testing.assert_allclose(float(m["loss"]), float(m["nll_loss"] + KL_WEIGHT * m["kl_loss"]), rtol=1e-6)
    for s in states[1:3]:
        assert _same(s.disc_params, s0.disc_params)
        assert _same(s.disc_batch_stats, s0.disc_batch_stats)
        assert _same(s.disc_opt_state, s0.disc_opt_state)
    assert not _same(states[1].params["ae"], s0.params["ae"])  # the generator did learn
    assert float(states[2].params["logvar"]) == 0.0  # LDM: logvar not optimised
    assert int(states[3].step) == 3
    m2 = metrics[2]  # step 2 == disc_start
    assert float(m2["disc_factor"]) == 1.0 and float(m2["disc_loss"]) > 0
    assert not _same(states[3].disc_params, states[2].disc_params)
    assert not _same(states[3].disc_batch_stats, states[2].disc_batch_stats)


def test_adaptive_weight_lpips_and_kl_terms(kl_steps):
    """Step 2 (first adversarial step) against an independent computation: d_weight ==
    ||d nll / dL|| / (||d g / dL|| + 1e-4) * 0.5 at the decoder's last conv L; nll includes LPIPS;
    kl_loss is the posterior KL; loss = nll + kl_weight * KL + d_weight * g; the generator
    gradient is that total's with d_weight held fixed."""
    config, model, x, states, metrics, lpips_params = kl_steps
    s, m = states[2], metrics[2]
    key = jax.random.fold_in(s.rng, s.step)
    disc = NLayerDiscriminator(ndf=config.loss.disc_ndf, n_layers=config.loss.disc_num_layers)
    lv = s.params["logvar"]

    def reference(ae, d_w):
        def forward(ae):
            return model.apply({"params": ae}, x, key=key, sample_posterior=True)

        def nll(ae):
            rec = forward(ae)[0]
            p = LPIPS().apply(lpips_params, x, rec)
            r = jnp.abs(x - rec) + p[:, None, None, None]
            return jnp.sum(r / jnp.exp(lv) + lv) / x.shape[0], jnp.mean(p)

        def g(ae):
            logits, _ = disc.apply({"params": s.disc_params, "batch_stats": s.disc_batch_stats}, forward(ae)[0],
                                   train=True, mutable=["batch_stats"])
            return -jnp.mean(logits)

        def kl(ae):
            return jnp.sum(forward(ae)[1].kl()) / x.shape[0]

        (nll_v, p), d_nll = jax.value_and_grad(nll, has_aux=True)(ae)
        g_v, d_g = jax.value_and_grad(g)(ae)
        kl_v, d_kl = jax.value_and_grad(kl)(ae)
        d_total = jax.tree.map(lambda a, b, c: a + KL_WEIGHT * c + d_w * b, d_nll, d_g, d_kl)
        last = lambda tree: tree["decoder"]["conv_out"]["kernel"]  # noqa: E731
        return dict(nll=nll_v, g=g_v, kl=kl_v, p=p, gn=jnp.linalg.norm(last(d_nll)), gg=jnp.linalg.norm(last(d_g)),
                    grad=optax.tree.norm(d_total))

    r = _host(jax.jit(reference, compiler_options=FAST_COMPILE)(s.params["ae"], jnp.float32(m["d_weight"])))
    want = np.clip(r["gn"] / (r["gg"] + 1e-4), 0, 1e4) * config.loss.disc_weight
    assert float(m["disc_factor"]) == 1.0 and want > 0
    np.testing.assert_allclose(float(m["d_weight"]), want, rtol=1e-4)
    assert r["p"] > 1e-4  # LPIPS contributes
    np.testing.assert_allclose(float(m["p_loss"]), r["p"], rtol=1e-4)
    np.testing.assert_allclose(float(m["nll_loss"]), r["nll"], rtol=1e-5)
    np.testing.assert_allclose(float(m["g_loss"]), r["g"], rtol=1e-5)
    np.testing.assert_allclose(float(m["kl_loss"]), r["kl"], rtol=1e-5)
    assert KL_WEIGHT * r["kl"] > 1e-3 * abs(r["nll"])  # the KL term matters at this weight
    np.testing.assert_allclose(float(m["loss"]), float(r["nll"] + KL_WEIGHT * r["kl"] + m["d_weight"] * r["g"]),
                               rtol=1e-5)
    np.testing.assert_allclose(float(m["grad_norm"]), r["grad"], rtol=1e-4)


# ------------------------------------------ KL, LPIPS off, 2 devices: learning, logging, exact resume
@pytest.fixture(scope="module")
def kl_run(data_dir, tmp_path_factory):
    # disc_weight 0.1 (LDM: 0.5): at disc_start the discriminator is untrained and the adaptive weight
    # scales its gradient to disc_weight x the reconstruction gradient at the decoder's last layer; at
    # 0.5 its first 20 steps lift L1 by ~40% on this 150-step run (0.31 -> 0.44), hiding what the test checks.
    config = _config(data_dir, disc_start=130, perceptual_weight=0.0, disc_weight=0.1)
    config.train.update(dict(num_steps=150, tensorboard=True, preview_every=75, checkpoint_every=75))
    work = str(tmp_path_factory.mktemp("ae_full"))
    state, history = vt.train_autoencoder(config, work, devices=jax.devices()[:2])
    return config, work, state, history


def test_autoencoder_learns(kl_run):
    """150 steps of the real AutoencoderKL on shapes_captions, data-parallel on 2 devices, the
    discriminator from step 130: reconstruction L1 falls clearly; checkpoints and logs are written."""
    config, work, state, history = kl_run
    assert int(state.step) == 150 and [h["step"] for h in history] == list(range(1, 151))
    first, last = history[0]["rec_loss"], np.mean([h["rec_loss"] for h in history[-10:]])
    assert np.isfinite([h["loss"] for h in history]).all()
    assert last < 0.6 * first, (first, last)
    assert history[129]["disc_factor"] == 0.0 and history[130]["disc_factor"] == 1.0  # steps 129, 130 (0-based)
    assert history[-1]["disc_loss"] > 0 and history[-1]["d_weight"] > 0
    mngr = ckpt_lib.CheckpointManager(os.path.join(work, "checkpoints"), save_every=75)
    assert mngr.all_steps() == [75, 150]
    mngr.close()
    assert os.listdir(os.path.join(work, "tensorboard")) and os.path.exists(os.path.join(work, "config.json"))
    # held-out shapes: mean |x - rec| (posterior mean) well below the untrained model's
    model = vt.build_autoencoder(config)
    held = config.copy_and_resolve_references()
    held.data.split = "heldout"
    held.train.batch_size = 8
    x = jnp.asarray(next(vt.make_data_iterator(held, config.data.data_dir))["image"])
    l1 = jax.jit(lambda p: jnp.mean(jnp.abs(x - model.apply({"params": p}, x)[0])), compiler_options=FAST_COMPILE)
    init = vt.setup(config, sharding.make_mesh({"data": 2}, jax.devices()[:2]))
    assert init.aux == {"lpips": {}}  # LPIPS off: no VGG anywhere
    assert float(l1(state.params["ae"])) < 0.6 * float(l1(init.state.params["ae"]))


def test_resume_is_exact(kl_run, tmp_path):
    """140 steps (past disc_start), then a resumed run to 150 == the uninterrupted 150 steps, bit for bit:
    autoencoder, discriminator (params, BatchNorm statistics), both optimizers, data position."""
    config, _, full, _ = kl_run
    c = config.copy_and_resolve_references()
    c.train.update(dict(tensorboard=False, preview_every=0, checkpoint_every=1000))
    c.train.num_steps = 140
    work = str(tmp_path / "split")
    first, _ = vt.train_autoencoder(c, work, devices=jax.devices()[:2])
    assert int(first.step) == 140
    c.train.num_steps = 150
    state, history = vt.train_autoencoder(c, work, devices=jax.devices()[:2])
    assert int(state.step) == 150 and history[0]["step"] == 141
    a, b = _flat(full), _flat(state)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------ VQ variant (VQModel + codebook loss)
def _vq_overrides(data_dir):
    return ["--config.loss.perceptual_weight=0.0", "--config.loss.disc_start=0", "--config.loss.codebook_weight=0.7",
            "--config.train.progress=False", "--config.train.tensorboard=False", "--config.train.preview_every=0",
            f"--config.train.compiler_options={FAST_COMPILE!r}", f"--config.data.data_dir={data_dir}",
            "--config.data.num_train=64", "--config.data.num_validation=8", "--config.data.num_heldout=8"]


def test_vq_variant_loss(data_dir):
    """kind='vq' with VQModel: nll is mean(rec), the codebook loss enters with codebook_weight, no
    KL/logvar (checked against the model's own outputs on the step's batch)."""
    config = load_config("tiny_autoencoder:vq")
    apply_overrides(config, _vq_overrides(data_dir))
    ts = vt.setup(config)  # all devices, as the CLI run below
    assert isinstance(ts.task.model, VQModel)
    x = next(vt.make_data_iterator(config, data_dir))["image"]
    params = _host(ts.state.params["ae"])
    _, m = ts.step_fn(ts.state, sharding.make_global_batch(ts.mesh, {"image": x}, 8), ts.aux)
    rec, info = jax.jit(ts.task.model.apply, compiler_options=FAST_COMPILE)({"params": params}, jnp.asarray(x))
    nll = float(jnp.mean(jnp.abs(x - rec)))
    np.testing.assert_allclose(float(m["nll_loss"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(m["codebook_loss"]), float(info["codebook_loss"]), rtol=1e-5)
    assert "kl_loss" not in m
    np.testing.assert_allclose(float(m["loss"]), nll + 0.7 * float(info["codebook_loss"]) + float(m["d_weight"] * m["g_loss"]),
                               rtol=1e-5)
    assert float(m["d_weight"]) > 0 and float(m["disc_factor"]) == 1.0


def test_vq_variant_trains_from_cli(data_dir, tmp_path):
    """``ldm-jax train --config tiny_autoencoder:vq`` end to end (shapes_captions, 8 devices,
    checkpoints), then resumed."""
    from ldm_jax import cli

    work = str(tmp_path / "vq")
    argv = ["train", "--config", "tiny_autoencoder:vq",
            "--workdir", work, "--config.train.num_steps=6", "--config.train.checkpoint_every=4",
            "--config.train.log_every=3"] + _vq_overrides(data_dir)
    assert cli.main(argv) == 0
    mngr = ckpt_lib.CheckpointManager(os.path.join(work, "checkpoints"), save_every=4)
    assert mngr.all_steps() == [4, 6]
    mngr.close()
    config = load_config("tiny_autoencoder:vq")
    apply_overrides(config, _vq_overrides(data_dir))
    config.train.num_steps = 9
    state, history = vt.train_autoencoder(config, work)  # resumes at 6
    assert [h["step"] for h in history] == [7, 8, 9] and int(state.step) == 9
    assert np.isfinite([h["loss"] for h in history]).all()
    assert all(h["codebook_loss"] > 0 and h["disc_factor"] == 1.0 for h in history)
