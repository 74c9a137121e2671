"""AutoencoderKL / VQModel against diffusers' PyTorch models (random tiny configs), plus the maths."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import VQModel as TorchVQModel

from ldm_jax.convert.torch_flax import torch_to_flax
from ldm_jax.models.autoencoder import (LAST_LAYER, AutoencoderKL, DiagonalGaussian, VectorQuantizer,
                                        codebook_perplexity, vae_from_config, vq_from_config)

TOL = 1e-4


def _randomise(model, seed, std=0.05):
    """Perturb every parameter (diffusers zero-inits nothing here, but default inits hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _convert(ref, ours, x):
    target = jax.eval_shape(ours.init, jax.random.key(0), jnp.asarray(x))["params"]
    return {"params": torch_to_flax(ref.state_dict(), target, source=type(ref).__name__)}


KL_CONFIGS = {
    "16-32_lpb1": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    "32-32-64_lpb2": dict(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8),
}


@pytest.fixture(scope="module", params=sorted(KL_CONFIGS))
def kl_pair(request):
    torch.manual_seed(0)
    n = len(KL_CONFIGS[request.param]["block_out_channels"])
    ref = TorchAutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n, **KL_CONFIGS[request.param])
    ref = _randomise(ref, 1)
    ours = vae_from_config(dict(ref.config))  # diffusers' config.json fields, extras dropped
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    return ref, ours, _convert(ref, ours, x), x


def _kl_all(model, x, z, key):
    """Every KL entry point in one traced function (one compile per config)."""
    post = model.encode(x)
    rec, _ = model(x)
    rec_sampled, post_b = model(x, key=key, sample_posterior=True)
    return dict(post=post, dec=model.decode(z), rec=rec, rec_sampled=rec_sampled,
                dec_of_sample=model.decode(post_b.sample(key)))


@pytest.fixture(scope="module")
def kl_outputs(kl_pair):
    ref, ours, params, x = kl_pair
    f = ours.downsample_factor
    z = np.random.default_rng(1).normal(size=(2, 32 // f, 32 // f, 4)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(_nchw(x)).latent_dist
        want = dict(mean=_nhwc(dist.mean), logvar=_nhwc(dist.logvar), dec=_nhwc(ref.decode(_nchw(z)).sample),
                    rec=_nhwc(ref(_nchw(x)).sample))  # diffusers' forward decodes the posterior mode
    got = jax.jit(partial(ours.apply, method=_kl_all))(params, jnp.asarray(x), jnp.asarray(z), jax.random.key(3))
    return want, got


def test_kl_encode_matches_diffusers(kl_pair, kl_outputs):
    _, ours, _, _ = kl_pair
    want, got = kl_outputs
    post = got["post"]
    assert isinstance(post, DiagonalGaussian)
    assert post.mean.shape == (2, 32 // ours.downsample_factor, 32 // ours.downsample_factor, 4)
    err_mean = np.abs(np.asarray(post.mean) - want["mean"]).max()
    err_logvar = np.abs(np.asarray(post.logvar) - want["logvar"]).max()
    print(f"encode max abs err: mean {err_mean:.2e}, logvar {err_logvar:.2e}")
    assert err_mean <= TOL and err_logvar <= TOL
    assert np.abs(want["logvar"]).max() > 1e-2 and np.abs(want["mean"]).max() > 1e-2  # not vacuous


def test_kl_decode_and_forward_match_diffusers(kl_pair, kl_outputs):
    _, ours, params, _ = kl_pair
    want, got = kl_outputs
    assert got["dec"].shape == want["dec"].shape == (2, 32, 32, 3)
    err_dec, err_rec = np.abs(got["dec"] - want["dec"]).max(), np.abs(got["rec"] - want["rec"]).max()
    print(f"decode max abs err {err_dec:.2e}, forward {err_rec:.2e}")
    assert err_dec <= TOL and err_rec <= TOL
    assert np.abs(want["dec"]).max() > 1e-2
    # sample_posterior=True decodes posterior.sample(key)
    np.testing.assert_allclose(got["rec_sampled"], got["dec_of_sample"], atol=1e-5)
    assert np.abs(got["rec_sampled"] - got["rec"]).max() > 1e-4
    # the adaptive GAN weight's last layer
    last = params["params"]
    for k in LAST_LAYER:
        last = last[k]
    assert last.shape == (3, 3, ours.block_out_channels[0], 3)


def test_kl_bad_inputs_are_clear_errors():
    model = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # the checks run before any compute
    with pytest.raises(ValueError, match="PRNG key"):
        model.apply(params, jnp.zeros((1, 4, 4, 3)), sample_posterior=True)
    with pytest.raises(ValueError, match="multiple of the downsample factor"):
        model.apply(params, jnp.zeros((1, 5, 5, 3)), method=AutoencoderKL.encode)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model.apply(params, jnp.zeros((1, 4, 4, 4)), method=AutoencoderKL.encode)
    with pytest.raises(ValueError, match=r"\[B, h, w, 4\]"):
        model.apply(params, jnp.zeros((1, 2, 2, 3)), method=AutoencoderKL.decode)


def test_full_size_parameter_count_sd_v1():
    from ldm_jax.configs import sd_v1

    model = AutoencoderKL(**sd_v1.get_config().vae)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert sum(v.size for v in jax.tree.leaves(shapes)) == 83_653_863


def test_vae_from_config_drops_extras_and_checks_fields():
    cfg = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.0", "act_fn": "silu",
           "block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8, "latent_channels": 4,
           "layers_per_block": 1, "force_upcast": True, "sample_size": 32, "not_a_field": 1}
    model = vae_from_config(cfg, attention_impl="xla")
    assert model.block_out_channels == (16, 32) and model.attention_impl == "xla"
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        jax.eval_shape(vae_from_config({**cfg, "block_out_channels": [12, 32]}).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="down_block_types"):
        jax.eval_shape(vae_from_config({**cfg, "down_block_types": ["DownEncoderBlock2D"]}).init,
                       jax.random.key(0), x)


def test_kl_and_nll_match_numpy():
    rng = np.random.default_rng(2)
    mean, logvar = rng.normal(size=(2, 4, 4, 4)), rng.normal(size=(2, 4, 4, 4))
    post = DiagonalGaussian.from_moments(jnp.asarray(np.concatenate([mean, logvar], -1), jnp.float32))
    want = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(post.kl(), want, rtol=1e-5)
    x = rng.normal(size=mean.shape)
    want_nll = 0.5 * np.sum(np.log(2 * np.pi) + logvar + (x - mean) ** 2 / np.exp(logvar), axis=(1, 2, 3))
    np.testing.assert_allclose(post.nll(jnp.asarray(x, jnp.float32)), want_nll, rtol=1e-5)
    np.testing.assert_allclose(post.kl(post), 0.0, atol=1e-5)
    assert np.array_equal(post.mode(), post.mean)
    eps = (np.asarray(post.sample(jax.random.key(0))) - mean) / np.exp(0.5 * logvar)
    assert abs(eps.mean()) < 0.3 and 0.7 < eps.std() < 1.3
    moments = jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 2), 50.0), jnp.full((1, 2, 2, 2), -50.0)], -1)
    clamped = DiagonalGaussian.from_moments(moments)
    assert float(clamped.logvar.max()) == 20.0 and float(clamped.logvar.min()) == -30.0
    leaves = jax.tree.leaves(jax.jit(lambda p: p)(post))  # a pytree, passes through jit
    assert len(leaves) == 2


# ----------------------------------------------------------------------------------------------
# VQ


@pytest.fixture(scope="module")
def vq_pair():
    torch.manual_seed(0)
    cfg = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=3,
               num_vq_embeddings=16, vq_embed_dim=3)
    ref = TorchVQModel(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       **cfg)
    ref = _randomise(ref, 3)
    with torch.no_grad():  # spread the codebook over the latents' range so several codes are used
        ref.quantize.embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    ours = vq_from_config(dict(ref.config))
    x = np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    return ref, ours, _convert(ref, ours, x), x


def test_vq_matches_diffusers(vq_pair):
    ref, ours, params, x = vq_pair
    with torch.no_grad():
        h = ref.encode(_nchw(x)).latents
        quant, loss, (_, _, idx) = ref.quantize(h)
        dec = ref.decode(h).sample
        dec_nq = ref.decode(h, force_not_quantize=True).sample

    def run(model, x):  # every VQ entry point in one traced function (one compile)
        h = model.encode(x)
        z_q, info = model.quantize_latents(h)
        rec, info2 = model(x)
        return dict(h=h, z_q=z_q, info=info, dec=model.decode(h), rec=rec, perplexity=info2["perplexity"],
                    dec_nq=model.decode(h, force_not_quantize=True), codes=model.decode_code(info["indices"]))

    got = jax.jit(partial(ours.apply, method=run))(params, jnp.asarray(x))
    info = got["info"]
    assert np.abs(got["h"] - _nhwc(h)).max() <= TOL
    np.testing.assert_array_equal(np.asarray(info["indices"]).reshape(-1), idx.numpy().reshape(-1))
    assert len(np.unique(np.asarray(info["indices"]))) > 2
    assert np.abs(got["z_q"] - _nhwc(quant)).max() <= TOL
    np.testing.assert_allclose(info["codebook_loss"], loss.item(), rtol=1e-4)
    err, err_nq, err_fwd, err_codes = (np.abs(got[k] - _nhwc(v)).max() for k, v in
                                       (("dec", dec), ("dec_nq", dec_nq), ("rec", dec), ("codes", dec)))
    print(f"VQ max abs err: decode {err:.2e}, unquantised {err_nq:.2e}, forward {err_fwd:.2e}, codes {err_codes:.2e}")
    assert max(err, err_nq, err_fwd, err_codes) <= TOL
    np.testing.assert_allclose(got["perplexity"], codebook_perplexity(info["indices"], 16), rtol=1e-6)


def test_vq_straight_through_gradient_reaches_encoder(vq_pair):
    _, ours, params, x = vq_pair

    def rec_loss(p):  # reconstruction only: the encoder gets gradient solely through the straight-through path
        rec, _ = ours.apply(p, jnp.asarray(x[:1, :16, :16]))
        return jnp.mean(rec ** 2)

    grads = jax.jit(jax.grad(rec_loss))(params)["params"]
    enc = np.abs(np.asarray(grads["encoder"]["conv_in"]["kernel"])).sum()
    qc = np.abs(np.asarray(grads["quant_conv"]["kernel"])).sum()
    assert enc > 0 and qc > 0
    assert np.abs(np.asarray(grads["quantize"]["embedding"]["embedding"])).sum() == 0  # no codebook grad


def test_vq_commitment_loss_and_its_gradients_match_numpy():
    vq = VectorQuantizer(n_e=8, vq_embed_dim=4, beta=0.25)
    z = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
    params = {"params": {"embedding": {"embedding": jax.random.normal(jax.random.key(2), (8, 4))}}}
    cb = np.asarray(params["params"]["embedding"]["embedding"], np.float64)
    flat = np.asarray(z, np.float64).reshape(-1, 4)
    idx = np.argmin(((flat[:, None] - cb[None]) ** 2).sum(-1), 1)
    nearest = cb[idx]
    z_q, info = jax.jit(vq.apply)(params, z)
    np.testing.assert_array_equal(np.asarray(info["indices"]).reshape(-1), idx)
    np.testing.assert_allclose(np.asarray(z_q).reshape(-1, 4), nearest, atol=1e-6)
    np.testing.assert_allclose(info["codebook_loss"], 1.25 * np.mean((nearest - flat) ** 2), rtol=1e-5)
    # straight through: d sum(3 z_q) / dz = 3
    np.testing.assert_allclose(jax.jit(jax.grad(lambda z: jnp.sum(3.0 * vq.apply(params, z)[0])))(z), 3.0,
                               rtol=1e-6)
    # legacy weighting: commitment term (weight 1) to z, beta on the codebook term
    g_p, g_z = jax.jit(jax.grad(lambda p, z: vq.apply(p, z)[1]["codebook_loss"], argnums=(0, 1)))(params, z)
    n = flat.size
    np.testing.assert_allclose(np.asarray(g_z).reshape(-1, 4), 2 * (flat - nearest) / n, atol=1e-6)
    want_cb = np.zeros_like(cb)
    np.add.at(want_cb, idx, 0.25 * 2 * (nearest - flat) / n)
    np.testing.assert_allclose(g_p["params"]["embedding"]["embedding"], want_cb, atol=1e-6)


def test_codebook_perplexity_and_usage():
    codebook = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    vq = VectorQuantizer(n_e=4, vq_embed_dim=2)
    z = jnp.tile(codebook, (2, 1)).reshape(1, 2, 4, 2)  # every code used exactly twice
    apply = jax.jit(vq.apply)
    _, info = apply({"params": {"embedding": {"embedding": codebook}}}, z)
    np.testing.assert_allclose(info["perplexity"], 4.0, rtol=1e-6)
    assert float(info["usage"]) == 1.0
    _, info = apply({"params": {"embedding": {"embedding": codebook}}}, jnp.ones((1, 2, 4, 2)) * codebook[1])
    np.testing.assert_allclose(info["perplexity"], 1.0, rtol=1e-6)
    assert float(info["usage"]) == 0.25
    np.testing.assert_allclose(codebook_perplexity(jnp.arange(64) % 16, 16), 16.0, rtol=1e-6)
