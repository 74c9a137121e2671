"""The implementations of dot_product_attention agree with each other and with numpy.

``impl="pallas"`` runs its TPU kernels under ``pallas_interpret()`` here (Pallas' interpreter on
CPU); :func:`test_pallas_compiles_for_a_tpu_topology` compiles the real kernels for a TPU topology.
float32 comparisons hold to 1e-5 because ``conftest`` sets ``jax_default_matmul_precision`` to
"highest" (XLA:CPU's default float32 dots, and the interpreted kernel's, are not all exact).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import attention
from ldm_jax.models.attention import IMPLEMENTATIONS, causal_mask, dot_product_attention, pallas_interpret


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
    with pallas_interpret():
        got = dot_product_attention(q, k, v, impl=impl, upcast=upcast, chunk_size=8)
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _naive(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_masks(impl):
    q, k, v = _inputs(seed=1, lq=13, lk=13)
    causal = causal_mask(13)  # [1, 1, L, L]
    with pallas_interpret():
        got = dot_product_attention(q, k, v, mask=causal, impl=impl, chunk_size=5)
    np.testing.assert_allclose(np.asarray(got), _naive(q, k, v, causal), atol=1e-5, rtol=0)
    # a per-example key padding mask [B, 1, 1, Lk]
    keep = np.ones((2, 1, 1, 13), bool)
    keep[0, ..., 9:] = False
    with pallas_interpret():
        got = dot_product_attention(q, k, v, mask=jnp.asarray(keep), impl=impl, chunk_size=5)
    np.testing.assert_allclose(np.asarray(got), _naive(q, k, v, keep), atol=1e-5, rtol=0)


def test_implementations_agree_bf16_with_upcast():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _inputs(seed=2, lq=40, lk=40, d=16))
    with pallas_interpret():
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


def _key_padding(b, lk):
    keep = np.ones((b, 1, 1, lk), bool)
    keep[0, ..., lk * 3 // 4:] = False  # the first example's last quarter is padding
    return keep


def _random_mask(b, lq, lk):
    keep = np.random.RandomState(5).rand(b, 1, lq, lk) > 0.3
    keep[..., 0] = True  # every query keeps a key
    return keep


# SD shapes, small: batch 2, heads 2. Self-attention over 200 latents (not a multiple of the kernel's
# 128-token blocks), cross-attention over 77 text tokens, SD 1's head dims 40/80/160 and SD 2's 64,
# and each way the kernel masks: segment ids (padded keys, key padding), causal, additive bias.
PALLAS_CASES = {
    "self200-d40": (200, 200, 40, None),
    "cross77-d64": (200, 77, 64, None),
    "cross77-d160": (64, 77, 160, None),
    "causal77-d80": (77, 77, 80, "causal"),
    "keypad200-d80": (200, 200, 80, "keys"),
    "bias-cross77-d40": (200, 77, 40, "bias"),
}


def _pallas_case(name):
    lq, lk, d, mask = PALLAS_CASES[name]
    q, k, v = (jnp.asarray(a) for a in _inputs(seed=6, b=2, lq=lq, lk=lk, h=2, d=d))
    mask = {None: None, "causal": causal_mask(lq), "keys": _key_padding(2, lk),
            "bias": _random_mask(2, lq, lk)}[mask]
    d_out = jax.random.normal(jax.random.key(8), q.shape)
    return q, k, v, mask, d_out


def _vjp(impl, q, k, v, mask, d_out, dtype=jnp.float32):
    """(out, dq, dk, dv) of ``impl`` on inputs cast to ``dtype``, everything returned in float32."""
    def f(q, k, v):
        return dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask,
                                     impl=impl).astype(jnp.float32)
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(d_out))


@pytest.mark.parametrize("name", list(PALLAS_CASES))
def test_pallas_matches_xla(name):
    """The TPU flash attention kernel (interpreted) equals the einsum attention in float32, forward and
    gradients: padding of head dim and lengths, and every kind of mask, are exact."""
    q, k, v, mask, d_out = _pallas_case(name)
    with pallas_interpret():
        got = jax.jit(lambda q, k, v, d: _vjp("pallas", q, k, v, mask, d))(q, k, v, d_out)
    want = jax.jit(lambda q, k, v, d: _vjp("xla", q, k, v, mask, d))(q, k, v, d_out)
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=f"{name} {what}")


@pytest.mark.parametrize("name", ["self200-d40", "causal77-d80"])
def test_pallas_bfloat16_close_to_float32(name):
    """In bfloat16 the kernel (float32 logits and softmax inside) stays within bfloat16 rounding of the
    float32 reference, forward and gradients."""
    q, k, v, mask, d_out = _pallas_case(name)
    with pallas_interpret():
        got = jax.jit(lambda q, k, v, d: _vjp("pallas", q, k, v, mask, d, jnp.bfloat16))(q, k, v, d_out)
    want = jax.jit(lambda q, k, v, d: _vjp("xla", q, k, v, mask, d))(q, k, v, d_out)
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
        assert np.isfinite(np.asarray(g)).all()
        # measured: <= 0.014 (the einsum attention in bfloat16: <= 0.058, its softmax being bfloat16)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-2, rtol=0, err_msg=f"{name} {what}")


def test_pallas_runs_per_device_on_a_mesh():
    """On a mesh (8 CPU devices) the kernel runs under shard_map on each device's batch rows and heads,
    found from jax.set_mesh for intermediates (as inside the UNet) and from the arguments' shardings
    of a jitted function; the result and gradients equal the unsharded einsum attention."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from ldm_jax.models.pallas_attention import split_axes

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    assert split_axes(mesh, 4, 2) == (("data",), ("tensor",))
    assert split_axes(mesh, 8, 3) == (("data", "tensor"), ())  # heads not divisible: batch takes it
    assert split_axes(mesh, 2, 1) == (("tensor",), ())  # "data" (4) divides neither: not split
    assert split_axes(mesh, 1, 1) == ((), ())  # each device computes the whole
    rows = NamedSharding(mesh, P("data"))
    q, k, v = (jax.device_put(jnp.asarray(a), rows) for a in _inputs(seed=9, b=4, lq=40, lk=40, h=2, d=16))
    d_out = jax.random.normal(jax.random.key(10), q.shape)
    want = jax.jit(lambda q, k, v, d: _vjp("xla", q, k, v, causal_mask(40), d))(q, k, v, d_out)

    def intermediates(q, k, v, d):  # q, k, v computed inside the jit carry no mesh: jax.set_mesh does
        return _vjp("pallas", q * 1.0, k * 1.0, v * 1.0, causal_mask(40), d)

    with pallas_interpret():
        with jax.set_mesh(mesh):
            inside = jax.jit(intermediates, in_shardings=(rows,) * 4)
            assert "shard_map" in str(inside.trace(q, k, v, d_out).jaxpr)
            got = inside(q, k, v, d_out)
        step = jax.jit(lambda q, k, v, d: _vjp("pallas", q, k, v, causal_mask(40), d), in_shardings=(rows,) * 4)
        assert "shard_map" in str(step.trace(q, k, v, d_out).jaxpr)
        got_args = step(q, k, v, d_out)
    for result in (got, got_args):
        for g, w, what in zip(result, want, ("out", "dq", "dk", "dv")):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=what)


def test_pallas_compiles_for_a_tpu_topology(monkeypatch):
    """jit(value_and_grad) through impl="pallas" lowers and compiles with the real TPU compiler
    (Mosaic, no interpret mode) for a v5e 2x2 topology, without a TPU: SD 1's first self-attention
    (64x64 latents = 4096 tokens, 8 heads of 40) in bfloat16, batch sharded over the 4 chips. The
    kernels run per chip under shard_map: no collective besides the loss's all-reduce. (conftest's
    "highest" matmul precision applies: the kernel must trace its bfloat16 dots at the default.)"""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask what TPU this is
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu's lockfile
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = Mesh(np.array(devices).reshape(4), ("data",))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, impl="pallas").astype(jnp.float32) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=(rows,) * 3,
                   out_shardings=(replicated, (rows,) * 3))
    x = jax.ShapeDtypeStruct((4, 4096, 8, 40), jnp.bfloat16, sharding=rows)
    hlo = step.lower(x, x, x).compile().as_text()
    assert hlo.count("tpu_custom_call") >= 3  # the forward kernel, dK/dV and dQ
    assert not [op for op in (" all-gather(", " all-to-all(", " collective-permute(") if op in hlo]


def test_cudnn_dispatch_rule():
    """Which calls of impl="dot_product" ask jax for cuDNN on a GPU (checked here without one)."""
    reason = attention.cudnn_unsupported_reason
    s = jax.ShapeDtypeStruct
    bf16 = lambda lq, d, lk=None: (s((2, lq, 8, d), jnp.bfloat16), *[s((2, lk or lq, 8, d), jnp.bfloat16)] * 2)  # noqa: E731
    ampere, hopper = (8, 0), (9, 0)
    assert reason(*bf16(4096, 64), compute_capability=ampere) is None  # SD 2's heads
    assert reason(*bf16(4096, 40), compute_capability=ampere) is None  # SD 1's
    assert reason(*bf16(1024, 80, lk=77), compute_capability=ampere) is None  # cross-attention: 77 keys
    assert "head dim 160" in reason(*bf16(256, 160), compute_capability=ampere)  # <= 128 before Hopper
    assert reason(*bf16(256, 160), compute_capability=hopper) is None  # <= 256 from Hopper
    assert "head dim 160" in reason(*bf16(256, 160))  # capability unknown: the pre-Hopper limit
    assert "head dim 300" in reason(*bf16(256, 300), compute_capability=hopper)
    assert "head dim 36" in reason(*bf16(256, 36), compute_capability=hopper)  # not a multiple of 8
    f16 = [s((2, 64, 8, 64), jnp.float16)] * 3
    assert reason(*f16, compute_capability=ampere) is None
    f32 = [s((2, 64, 8, 64), jnp.float32)] * 3
    assert "float16 or bfloat16" in reason(*f32, compute_capability=hopper)
    assert "float16 or bfloat16" in reason(f16[0], *[s((2, 64, 8, 64), jnp.bfloat16)] * 2)
    assert "upcast" in reason(*bf16(64, 64), upcast=True, compute_capability=hopper)
    # masks: the concrete causal mask is cuDNN's causal mask type; any other is a bias, whose
    # gradient needs even lengths (CLIP's 77 tokens are odd)
    assert reason(*bf16(77, 64), mask=causal_mask(77), compute_capability=ampere) is None
    assert "even lengths" in reason(*bf16(77, 64), mask=np.ones((2, 1, 1, 77), bool), compute_capability=ampere)
    assert reason(*bf16(64, 64, lk=78), mask=np.ones((2, 1, 64, 78), bool), compute_capability=ampere) is None
    assert "9.11" in reason(*bf16(64, 64), compute_capability=(10, 3), cudnn_version=91000)
    assert reason(*bf16(64, 64), compute_capability=(10, 3), cudnn_version=91100) is None


def test_dot_product_asks_for_xla_off_gpu(monkeypatch):
    """On CPU (and TPU) impl="dot_product" calls jax's XLA implementation explicitly, even where cuDNN
    would take the shapes."""
    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _inputs(lq=16, lk=16, d=64))
    dot_product_attention(q, k, v, impl="dot_product")
    assert calls[-1]["implementation"] == "xla"


def test_tpu_auto_rule(monkeypatch):
    """impl="auto" on a TPU takes the Pallas kernel for long self-attention and keeps the XLA paths for
    cross-attention over 77 text tokens, short sequences and [Lq, Lk] masks; and only where the kernel
    can be placed (one device, or a known mesh)."""
    from jax.sharding import Mesh

    rule = attention.tpu_uses_pallas
    assert attention.PALLAS_MIN_KV_LEN == 1024
    assert rule(4096, 4096, 40) and rule(1024, 1024, 80)  # SD 1 at 512 px: 64x64 and 32x32 latents
    assert not rule(4096, 77, 40) and not rule(1024, 77, 80)  # cross-attention to the text
    assert not rule(256, 256, 160) and not rule(64, 64, 160)  # 16x16 and 8x8 latents
    assert rule(1024, 1024, 64, mask=np.ones((2, 1, 1, 1024), bool))  # key padding: segment ids
    assert rule(1024, 1024, 64, mask=causal_mask(1024))  # the kernel's causal flag
    assert not rule(1024, 1024, 64, mask=np.ones((2, 1, 1024, 1024), bool))  # would need the [L, L] bias

    picked = []
    monkeypatch.setattr(attention, "_pallas", lambda q, k, v, mask, scale, upcast: picked.append(q.shape) or q)
    monkeypatch.setattr(attention, "current_platform", lambda: "tpu")
    long_q = jnp.zeros((8, 1024, 1, 8))
    jax.eval_shape(lambda q: dot_product_attention(q, q, q), long_q)
    assert picked == []  # 8 devices and no mesh: XLA could not partition the kernel, so not taken
    with jax.set_mesh(Mesh(np.array(jax.devices()[:8]), ("data",))):
        jax.eval_shape(lambda q: dot_product_attention(q, q, q), long_q)
        assert picked == [long_q.shape]
        jax.eval_shape(lambda q, c: dot_product_attention(q, c, c), long_q, jnp.zeros((8, 77, 1, 8)))
        assert picked == [long_q.shape]  # cross-attention: not the kernel
    monkeypatch.setattr(attention, "current_platform", lambda: "cpu")
    with jax.set_mesh(Mesh(np.array(jax.devices()[:8]), ("data",))):
        jax.eval_shape(lambda q: dot_product_attention(q, q, q), long_q)
    assert picked == [long_q.shape]  # "auto" on CPU is unchanged
