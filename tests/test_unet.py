"""Parity of the Flax UNet with diffusers' PyTorch UNet2DConditionModel (random tiny models)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from ldm_jax.configs import sd_v1, sd_v2
from ldm_jax.convert.torch_flax import torch_to_flax
from ldm_jax.models.unet import UNet2DConditionModel, get_timestep_embedding, unet_from_config

# SD v1 style: int heads, 1x1-conv projections; 3 levels and 2 layers per block for the skips.
V1 = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
    cross_attention_dim=32,
    norm_num_groups=8,
)
# SD v2 style: per-level heads, linear projections, fp32 attention, wider context.
V2 = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    cross_attention_dim=48,
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=16,
)
INPAINT = dict(V2, in_channels=9, use_linear_projection=False, upcast_attention=False, attention_head_dim=2)


def _case(cfg, size, seed=0, ctx_len=7):
    """(reference torch model, flax module, flax params, inputs NHWC, reference output NHWC)."""
    torch.manual_seed(seed)
    ref = TorchUNet(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    model = unet_from_config(ref.config)
    rng = np.random.RandomState(seed)
    x = rng.randn(2, size, size, cfg["in_channels"]).astype(np.float32)
    t = np.array([3, 917])
    ctx = rng.randn(2, ctx_len, cfg["cross_attention_dim"]).astype(np.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)["params"]
    params = torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, shapes, source="reference")
    with torch.no_grad():
        out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    return ref, model, params, (x, t, ctx), out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def v1():
    return _case(V1, 16)


@pytest.fixture(scope="module")
def v2():
    return _case(V2, 8, seed=1)


def _run(model, params, inputs):
    return np.asarray(jax.jit(model.apply)({"params": params}, *inputs))


def test_v1_parity(v1):
    _, model, params, inputs, want = v1
    got = _run(model, params, inputs)
    assert got.shape == want.shape == (2, 16, 16, 4)
    assert np.abs(want).max() > 1e-2  # every path contributes (weights randomised)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_v2_parity(v2):
    _, model, params, inputs, want = v2
    assert model.use_linear_projection and model.upcast_attention and model.attention_head_dim == (2, 4)
    got = _run(model, params, inputs)
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_contexts_per_sample_match_repeated_samples(v1):
    """A context with k rows per sample (CFG's [uncond, cond] pairs) gives the same output as each
    sample repeated k times in place, with fewer FLOPs: the layers before the first cross-attention
    run once per sample. A context whose rows are not a multiple of the batch is refused."""
    _, model, params, (x, t, ctx), _ = v1
    pairs = np.random.RandomState(5).randn(4, *ctx.shape[1:]).astype(np.float32)  # rows 2i, 2i+1 -> sample i
    shared = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    repeated = jax.jit(lambda p, x, t, c: model.apply({"params": p}, jnp.repeat(x, 2, 0), jnp.repeat(t, 2), c))
    got, want = np.asarray(shared(params, x, t, pairs)), np.asarray(repeated(params, x, t, pairs))
    assert got.shape == (4, 16, 16, 4)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the two contexts of a sample differ (100x the tolerance)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    share = _flops(shared.lower(params, x, t, pairs).compile()) / _flops(repeated.lower(params, x, t, pairs).compile())
    assert share < 0.98, share  # 0.952 here: conv_in, resnets_0 and the first attn1 at half the rows
    with pytest.raises(ValueError, match="k contexts per sample"):
        model.apply({"params": params}, x, t, pairs[:3])


def test_inpainting_parity_odd_size_scalar_timestep():
    """9 input channels; a float scalar timestep is broadcast; a 7x5 input (not divisible by
    2**levels) makes the upsamplers resize to the skips' sizes, as diffusers does."""
    torch.manual_seed(2)
    ref = TorchUNet(**INPAINT).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    model = unet_from_config(ref.config)
    rng = np.random.RandomState(2)
    x = rng.randn(2, 7, 5, 9).astype(np.float32)
    ctx = rng.randn(2, 3, 48).astype(np.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, 0.0, ctx)["params"]
    params = torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, shapes)
    assert params["conv_in"]["kernel"].shape == (3, 3, 9, 32)
    got = _run(model, params, (x, 421.5, ctx))
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), 421.5, torch.from_numpy(ctx)).sample
    want = want.permute(0, 2, 3, 1).numpy()
    assert got.shape == (2, 7, 5, 4) and np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding as ref_embedding

    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    for flip, shift, dim in [(True, 0, 32), (False, 1, 33)]:
        want = ref_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
        got = np.asarray(get_timestep_embedding(jnp.asarray(t), dim, flip, shift))
        # float32 arguments up to ~1e3 rad carry ~6e-5 rounding (1 ulp at 999), in either library.
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[:3], want[:3], atol=1e-5, rtol=0)


def test_attention_impls_agree(v2):
    _, model, params, inputs, _ = v2
    base = _run(model, params, inputs)  # "auto" = "xla" on CPU
    for impl in ("dot_product", "chunked"):
        # chunk 24 does not divide the 64 image tokens, so the padded-chunk path runs too.
        other = model.clone(attention_impl=impl, attention_chunk_size=24)
        np.testing.assert_allclose(_run(other, params, inputs), base, atol=1e-5, rtol=0, err_msg=impl)


def test_bf16_forward(v2):
    _, model, params, inputs, want = v2
    got = _run(model.clone(dtype=jnp.bfloat16), params, inputs)
    assert got.dtype == jnp.bfloat16
    got = got.astype(np.float32)
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 5e-2, err


@pytest.mark.parametrize("policy", [True, "dots"])
def test_remat_same_params_output_and_gradients(v2, policy):
    """Every remat policy changes what the backward recomputes, never the numbers."""
    _, model, params, inputs, _ = v2
    rm = model.clone(remat=policy)
    shapes = jax.eval_shape(rm.init, jax.random.key(0), *inputs)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    np.testing.assert_allclose(_run(rm, params, inputs), _run(model, params, inputs), atol=1e-6, rtol=0)
    if policy is True:
        return  # the gradients of a full remat are jax's own business; "dots" saves some values
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, *inputs) ** 2)  # noqa: E731
    want, got = jax.jit(jax.grad(loss(model)))(params), jax.jit(jax.grad(loss(rm)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_remat_policy_names():
    from ldm_jax.models.remat import policy_name

    assert [policy_name(p) for p in (True, False, None, "dots", "offload")] == ["full", "none", "none", "dots",
                                                                                 "offload"]
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        policy_name("some")


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _flax_count(cfg):
    model = UNet2DConditionModel(**cfg)
    x = jax.ShapeDtypeStruct((1, 64, 64, cfg["in_channels"]), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 77, cfg["cross_attention_dim"]), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return _count(jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)["params"])


def test_full_size_param_counts():
    assert _flax_count(dict(sd_v1.get_config().unet)) == 859_520_964
    cfg = dict(sd_v2.get_config().unet)
    with torch.device("meta"):
        ref = TorchUNet(**cfg)
    assert _flax_count(cfg) == sum(p.numel() for p in ref.parameters())


def test_unet_from_config_filters_and_validates():
    cfg = dict(
        V1,
        _class_name="UNet2DConditionModel",
        _diffusers_version="0.6.0",
        block_out_channels=[32, 32, 64],
        center_input_sample=False,
        act_fn="silu",
        only_cross_attention=False,
    )
    model = unet_from_config(cfg, attention_impl="xla")
    assert model.block_out_channels == (32, 32, 64) and model.attention_impl == "xla"
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_from_config(dict(V1, class_embed_type="timestep"))
    bad = UNet2DConditionModel(**dict(V1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")))
    x = jnp.zeros((1, 16, 16, 4))
    with pytest.raises(ValueError, match="one down and one up block type per level"):
        jax.eval_shape(bad.init, jax.random.key(0), x, 1, jnp.zeros((1, 3, 32)))
    good = UNet2DConditionModel(**V1)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        jax.eval_shape(good.init, jax.random.key(0), x, 1, jnp.zeros((1, 3, 31)))
    with pytest.raises(ValueError, match="sample must be NHWC"):
        jax.eval_shape(good.init, jax.random.key(0), jnp.zeros((1, 4, 16, 16)), 1, jnp.zeros((1, 3, 32)))
