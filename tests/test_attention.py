"""The implementations of dot_product_attention agree with each other and with numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.attention import IMPLEMENTATIONS, causal_mask, dot_product_attention


def _naive(q, k, v, mask=None):
    """float64 numpy softmax attention on [B, L, H, D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def _inputs(seed=0, b=2, lq=37, lk=11, h=3, d=8):
    rng = np.random.RandomState(seed)
    q = rng.randn(b, lq, h, d).astype(np.float32)
    k = rng.randn(b, lk, h, d).astype(np.float32)
    v = rng.randn(b, lk, h, d).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("upcast", [False, True])
def test_matches_numpy(impl, upcast):
    q, k, v = _inputs()
    # chunk 8 does not divide the 37 queries: exercises the padded last chunk.
    got = dot_product_attention(q, k, v, impl=impl, upcast=upcast, chunk_size=8)
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _naive(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_masks(impl):
    q, k, v = _inputs(seed=1, lq=13, lk=13)
    causal = causal_mask(13)  # [1, 1, L, L]
    got = dot_product_attention(q, k, v, mask=causal, impl=impl, chunk_size=5)
    np.testing.assert_allclose(np.asarray(got), _naive(q, k, v, causal), atol=1e-5, rtol=0)
    # a per-example key padding mask [B, 1, 1, Lk]
    keep = np.ones((2, 1, 1, 13), bool)
    keep[0, ..., 9:] = False
    got = dot_product_attention(q, k, v, mask=jnp.asarray(keep), impl=impl, chunk_size=5)
    np.testing.assert_allclose(np.asarray(got), _naive(q, k, v, keep), atol=1e-5, rtol=0)


def test_implementations_agree_bf16_with_upcast():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _inputs(seed=2, lq=40, lk=40, d=16))
    outs = {
        impl: np.asarray(dot_product_attention(q, k, v, impl=impl, upcast=True, chunk_size=16), np.float32)
        for impl in IMPLEMENTATIONS
    }
    for impl, out in outs.items():
        assert out.dtype == np.float32 and np.isfinite(out).all()
        np.testing.assert_allclose(out, outs["xla"], atol=2e-2, rtol=0, err_msg=impl)
    want = _naive(*(np.asarray(a, np.float32) for a in (q, k, v)))
    np.testing.assert_allclose(outs["xla"], want, atol=2e-2, rtol=0)


def test_unknown_impl():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="unknown attention implementation"):
        dot_product_attention(q, k, v, impl="flash")


@pytest.mark.parametrize("q_len,chunk", [(70, 16), (48, 16), (12, 64)])
def test_blocked_backward_matches_autodiff(q_len, chunk):
    """The chunked implementation's custom (flash-style) gradient equals autodiff of the einsum one."""
    kq, kk, kv, kd = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(kq, (2, q_len, 3, 8))
    k = jax.random.normal(kk, (2, 37, 3, 8))
    v = jax.random.normal(kv, (2, 37, 3, 8))
    d_out = jax.random.normal(kd, q.shape)

    def grads(impl):
        out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, impl=impl, chunk_size=chunk), q, k, v)
        return (out, *vjp(d_out))

    for got, want, name in zip(jax.jit(lambda: grads("chunked"))(), jax.jit(lambda: grads("xla"))(),
                               ("out", "dq", "dk", "dv")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5, err_msg=name)


def test_blocked_backward_bf16_upcast_close_to_float32():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 40, 2, 8)) for i in range(3))
    loss = lambda impl, dt, up: lambda q, k, v: dot_product_attention(  # noqa: E731
        q.astype(dt), k.astype(dt), v.astype(dt), impl=impl, upcast=up, chunk_size=16).astype(jnp.float32).sum()
    ref = jax.grad(loss("xla", jnp.float32, False), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss("chunked", jnp.bfloat16, True), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, ref):
        assert g.dtype == jnp.float32  # grads come back in the inputs' dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-2, rtol=5e-2)


def test_block_plan():
    from ldm_jax.models.attention import BLOCK_ELEMENTS, block_plan

    assert block_plan(1, 8, 1024, 1024) == (1, 1024)  # SD's 32x32-latent self-attention, one image
    assert block_plan(4, 8, 1024, 1024) == (1, 256)  # the batch stays whole: fewer queries per block
    assert block_plan(4, 8, 256, 256) == (4, 256)  # 2M logits: two blocks of ~1M
    assert block_plan(2, 8, 256, 256) == (8, 256)  # all fit: one block
    assert block_plan(16, 4, 64, 64) == (4, 64)  # a small problem (the demo UNet's): one block, no loop
    assert block_plan(4, 8, 1024, 77) == (4, 1024)
    assert block_plan(2, 8, 4096, 4096) == (1, 128)  # 64x64 latents: query blocks of a power of two
    assert block_plan(1, 1, 10, 10) == (1, 10)
    assert block_plan(4, 8, 1024, 1024, chunk_size=64) == (8, 64)  # an explicit chunk: all heads, as asked
    assert block_plan(1, 8, 1024, 1024, min_heads=4) == (4, 256)  # the backward pass with small heads
    for b, h, lq, lk in [(2, 3, 37, 11), (4, 8, 4096, 4096), (1, 7, 5000, 300), (1, 2, 3, 10 ** 7), (64, 8, 1024, 1024)]:
        g, c = block_plan(b, h, lq, lk)
        assert h % g == 0 and 1 <= c <= lq
        assert g == 1 or b * g * c * lk <= BLOCK_ELEMENTS


@pytest.mark.parametrize("q_len,block_elements,plans,d", [
    (37, 2 * 37 * 22, (2, 37, 2, 37), 8),  # two heads per block, no query loop
    (37, 8 * 22, (1, 8, 1, 8), 8),  # one head x 8 queries, padded last block
    (32, 2 * 32 * 22, (2, 32, 4, 16), 8),  # the backward pass blocked apart: 4 heads x 16 queries
    (32, 2 * 32 * 22, (2, 32, 2, 32), 32),  # heads above SMALL_HEAD_DIM: matmul backward
])
def test_head_and_query_blocks(q_len, block_elements, plans, d):
    """Blocks of heads x queries (batch of 2 kept whole, 4 heads, 11 keys) in the forward and the
    backward pass: values and gradients against the einsum implementation."""
    from ldm_jax.models.attention import block_plans

    q, k, v = (jnp.asarray(a) for a in _inputs(seed=3, b=2, lq=q_len, lk=11, h=4, d=d))
    assert block_plans(2, 4, q_len, 11, d, block_elements=block_elements) == plans
    d_out = jax.random.normal(jax.random.key(5), q.shape)

    def grads(impl, **kw):
        out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, impl=impl, **kw), q, k, v)
        return (out, *vjp(d_out))

    got = jax.jit(lambda: grads("chunked", block_elements=block_elements))()
    want = jax.jit(lambda: grads("xla"))()
    np.testing.assert_allclose(np.asarray(got[0]), _naive(q, k, v), atol=1e-5, rtol=0)
    for g, w, name in zip(got, want, ("out", "dq", "dk", "dv")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-5, err_msg=f"{plans} {name}")


@pytest.mark.parametrize("block_elements", [8 * 1 * 16 * 16, 8 * 2 * 32 * 16])
def test_blocks_keep_a_sharded_batch_on_its_devices(block_elements):
    """On a mesh that shards the batch, the blocked attention and its gradient run without any
    collective: every block holds the whole (sharded) batch, so no device needs another's rows."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rows = NamedSharding(mesh, P("data"))
    q, k, v = (jax.device_put(jnp.asarray(a), rows) for a in _inputs(seed=4, b=8, lq=32, lk=16, h=4, d=8))

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, impl="chunked", block_elements=block_elements) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=(rows,) * 3,
                   out_shardings=(NamedSharding(mesh, P()), (rows,) * 3))
    hlo = step.lower(q, k, v).compile().as_text()
    collectives = [op for op in (" all-gather(", " all-to-all(", " collective-permute(", " reduce-scatter(")
                   if op in hlo]
    assert not collectives, collectives
    assert hlo.count(" all-reduce(") <= 1  # the scalar loss only
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*(jax.device_get(t) for t in (q, k, v)))
    got = step(q, k, v)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)
