"""[make test-slow: ~14 min on 2 cores until the tests share one compiled step] Autoencoder training stage: PatchGAN parity, hinge loss, adaptive weight, disc start, learning."""
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from ldm_jax.config_utils import load_config
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import LPIPS
from ldm_jax.train import vae_trainer as vt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------- a tiny stand-in model
@flax.struct.dataclass
class _Gaussian:
    mean: jax.Array
    logvar: jax.Array

    def sample(self, key):
        return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(key, self.mean.shape)

    def kl(self):
        return 0.5 * jnp.sum(self.mean**2 + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


class _Decoder(nn.Module):
    @nn.compact
    def __call__(self, z):
        h = nn.silu(nn.Conv(16, (3, 3), name="conv_in")(z))
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
        h = nn.silu(nn.Conv(16, (3, 3), name="conv_mid")(h))
        return nn.Conv(3, (3, 3), name="conv_out")(h)


class TinyKL(nn.Module):
    """AutoencoderKL's interface (``(x, key, sample_posterior) -> (rec, posterior)``), 2 convs each way."""

    @nn.compact
    def __call__(self, x, key=None, sample_posterior=False):
        h = nn.silu(nn.Conv(16, (3, 3), strides=(2, 2), name="encoder_conv")(x))
        moments = nn.Conv(8, (3, 3), name="quant_conv")(h)
        post = _Gaussian(moments[..., :4], jnp.clip(moments[..., 4:], -30.0, 20.0))
        z = post.sample(key) if sample_posterior else post.mean
        return _Decoder(name="decoder")(z), post


def _config(**loss):
    c = load_config(os.path.join(ROOT, "configs", "tiny_autoencoder.py"))
    c.loss.disc_ndf = 8
    c.loss.disc_num_layers = 2
    for k, v in loss.items():
        c.loss[k] = v
    return c


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(vt.synthetic_images(8, 16, seed=1))


@pytest.fixture(scope="module")
def setup(images):
    """State at step 3 with disc_start 2 (adversarial part active) and a jitted step."""
    config = _config(disc_start=2)
    model = TinyKL()
    state = vt.create_train_state(config, model, jax.random.PRNGKey(0), images.shape)
    step = jax.jit(vt.make_train_step(config, model))
    for _ in range(3):
        state, _ = step(state, images)
    return config, model, state, step


# --------------------------------------------------------------------------------------- tests
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
    for train in (False, True):
        ref.train(train)
        with torch.no_grad():
            want = ref.forward(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
        got, _ = ours.apply({"params": params, "batch_stats": stats}, xj, train=train, mutable=["batch_stats"])
        assert got.shape == want.shape == (4, 32 // 2**n_layers - 2, 32 // 2**n_layers - 2, 1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)
    # taming init: conv N(0, 0.02), BatchNorm scale N(1, 0.02)
    init = ours.init(jax.random.PRNGKey(1), xj, train=False)["params"]
    assert abs(float(jnp.std(init["main_2"]["kernel"])) - 0.02) < 0.003
    assert abs(float(jnp.mean(init["main_3"]["scale"])) - 1.0) < 0.01


def test_adaptive_weight_is_gradient_norm_ratio(setup, images):
    """d_weight of a step == ||d nll / dL|| / (||d g / dL|| + 1e-4) * 0.5 computed directly."""
    config, model, state, step = setup
    _, metrics = step(state, images)
    key = jax.random.fold_in(state.rng, state.step)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)

    def rec_of(ae):
        return model.apply({"params": ae}, images, key=key, sample_posterior=True)[0]

    def nll(ae):
        rec = rec_of(ae)
        p = LPIPS().apply(state.lpips_params, images, rec)
        r = jnp.abs(images - rec) + p[:, None, None, None]
        lv = state.params["logvar"]
        return jnp.sum(r / jnp.exp(lv) + lv) / images.shape[0]

    def g(ae):
        logits, _ = disc.apply({"params": state.disc_params, "batch_stats": state.disc_batch_stats},
                               rec_of(ae), train=True, mutable=["batch_stats"])
        return -jnp.mean(logits)

    last = lambda tree: tree["decoder"]["conv_out"]["kernel"]
    gn = np.linalg.norm(np.asarray(last(jax.jit(jax.grad(nll))(state.params["ae"]))))
    gg = np.linalg.norm(np.asarray(last(jax.jit(jax.grad(g))(state.params["ae"]))))
    want = np.clip(gn / (gg + 1e-4), 0, 1e4) * 0.5
    assert float(metrics["disc_factor"]) == 1.0
    assert want > 0
    np.testing.assert_allclose(float(metrics["d_weight"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["nll_loss"]), float(jax.jit(nll)(state.params["ae"])), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["g_loss"]), float(jax.jit(g)(state.params["ae"])), rtol=1e-5)
    # total = nll + kl_weight * KL + d_weight * g
    np.testing.assert_allclose(
        float(metrics["loss"]),
        float(metrics["nll_loss"] + 1e-6 * metrics["kl_loss"] + metrics["d_weight"] * metrics["g_loss"]),
        rtol=1e-6)
    # the generator gradient is the gradient of that total with d_weight held fixed
    d_w = float(metrics["d_weight"])

    def total(ae):
        rec, post = model.apply({"params": ae}, images, key=key, sample_posterior=True)
        kl = jnp.sum(post.kl()) / images.shape[0]
        return nll(ae) + 1e-6 * kl + d_w * g(ae)

    gt = jax.jit(jax.grad(total))(state.params["ae"])
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(vt.optax.tree.norm(gt)), rtol=1e-4)


def test_no_discriminator_before_disc_start(images):
    config = _config(disc_start=2)
    model = TinyKL()
    state0 = vt.create_train_state(config, model, jax.random.PRNGKey(0), images.shape)
    step = jax.jit(vt.make_train_step(config, model))
    state1, m0 = step(state0, images)
    state2, m1 = step(state1, images)
    for m in (m0, m1):  # steps 0 and 1
        assert float(m["disc_factor"]) == 0.0 and float(m["disc_loss"]) == 0.0
        np.testing.assert_allclose(float(m["loss"]), float(m["nll_loss"] + 1e-6 * m["kl_loss"]), rtol=1e-6)
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    for s in (state1, state2):
        assert same(s.disc_params, state0.disc_params)
        assert same(s.disc_batch_stats, state0.disc_batch_stats)
        assert same(s.disc_opt_state, state0.disc_opt_state)
    assert not same(state1.params["ae"], state0.params["ae"])  # the generator did learn
    assert float(state2.params["logvar"]) == 0.0  # LDM: logvar not optimised
    state3, m2 = step(state2, images)  # step 2 == disc_start
    assert float(m2["disc_factor"]) == 1.0 and float(m2["disc_loss"]) > 0
    assert not same(state3.disc_params, state2.disc_params)
    assert not same(state3.disc_batch_stats, state2.disc_batch_stats)


def test_vq_variant_loss(images):
    """kind='vq': nll is mean(rec), the codebook loss enters with codebook_weight, no KL/logvar."""

    class TinyVQ(nn.Module):
        @nn.compact
        def __call__(self, x):
            z = nn.Conv(4, (3, 3), strides=(2, 2), name="encoder_conv")(x)
            codebook_loss = 0.25 * jnp.mean(z**2)  # stands in for the quantiser's loss
            return _Decoder(name="decoder")(z), codebook_loss

    config = _config(kind="vq", disc_start=0, codebook_weight=0.7)
    model = TinyVQ()
    state = vt.create_train_state(config, model, jax.random.PRNGKey(0), images.shape)
    _, m = jax.jit(vt.make_train_step(config, model))(state, images)
    rec, cb = jax.jit(model.apply)({"params": state.params["ae"]}, images)
    p = jax.jit(LPIPS().apply)(state.lpips_params, images, rec)
    nll = jnp.mean(jnp.abs(images - rec) + p[:, None, None, None])
    np.testing.assert_allclose(float(m["nll_loss"]), float(nll), rtol=1e-5)
    np.testing.assert_allclose(float(m["codebook_loss"]), float(cb), rtol=1e-5)
    np.testing.assert_allclose(
        float(m["loss"]), float(nll + 0.7 * cb + m["d_weight"] * m["g_loss"]), rtol=1e-5)
    assert float(m["d_weight"]) > 0


def test_tiny_autoencoder_learns(tmp_path):
    """~150 steps on 8 devices (data parallel) with checkpoints: reconstruction L1 falls clearly;
    a resumed run continues from the last checkpoint. LPIPS is off here (random VGG weights say
    nothing perceptual, and it is 20x the step cost of this model on CPU); it is tested above."""
    config = _config(disc_start=120, perceptual_weight=0.0)
    config.train.num_steps = 150
    config.train.log_every = 10
    config.train.checkpoint_every = 75
    config.train.progress = False
    model = TinyKL()
    state, history = vt.train_autoencoder(config, str(tmp_path), model=model)
    assert int(state.step) == 150
    first, last = history[0]["rec_loss"], min(h["rec_loss"] for h in history[-3:])
    assert last < 0.5 * first, (first, last)
    assert history[-1]["disc_factor"] == 1.0 and history[0]["disc_factor"] == 0.0
    # held-out images: mean |x - rec| well below the untrained model's
    x = jnp.asarray(vt.synthetic_images(16, 16, seed=123))
    l1 = lambda p: float(jnp.mean(jnp.abs(x - model.apply({"params": p}, x)[0])))
    init = vt.create_train_state(config, model, jax.random.PRNGKey(0), (8, 16, 16, 3))
    assert l1(state.params["ae"]) < 0.5 * l1(init.params["ae"])
    # resume: 150 -> 160 starts from the step-150 checkpoint
    config.train.num_steps = 160
    state2, history2 = vt.train_autoencoder(config, str(tmp_path), model=model)
    assert int(state2.step) == 160 and history2[0]["step"] == 160
