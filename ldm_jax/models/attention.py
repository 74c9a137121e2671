"""One scaled dot-product attention function with selectable implementations.

All implementations take and return ``[batch, length, heads, head_dim]`` arrays and agree to
float rounding:

- ``"xla"``: einsum + softmax, the plain reference.
- ``"dot_product"``: ``jax.nn.dot_product_attention`` (XLA on CPU/TPU; cuDNN flash attention on
  GPU when dtypes/shapes allow).
- ``"chunked"``: blocks of queries (and, without a mask, of heads) under ``lax.scan``, so memory
  grows with the block instead of ``q_len * kv_len`` (long sequences, large images), with a
  blocked custom backward when there is no mask. Every block holds the whole batch, so a batch
  sharded over a mesh stays on its devices (:func:`block_plan`).
- ``"auto"``: ``dot_product`` on GPU; ``chunked`` for sequences longer than ``chunk_size`` (64), and on
  CPU for any unmasked one (its custom backward is the faster one there at every length);
  ``xla`` otherwise.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "dot_product", "chunked")


def _xla(q, k, v, mask, scale, upcast):
    dtype = q.dtype
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32) if upcast else logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v).astype(dtype)


def _dot_product(q, k, v, mask, scale, upcast):
    dtype = q.dtype
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    return out.astype(dtype)


# Logits per block of the unmasked blocked attention when no chunk size is given: ~6 MiB of float32,
# what stays in a CPU's L2/L3 between the logits dot, the exp and the value dot (faster than blocks
# of 64 queries over all heads at every measured size; figures in docs/benchmarks.md).
BLOCK_ELEMENTS = 3 << 19
# Head dimensions up to this take the multiply-reduce backward (see _backward_block).
SMALL_HEAD_DIM = 16


def block_plan(batch: int, heads: int, q_len: int, kv_len: int, chunk_size: int | None = None,
               block_elements: int = BLOCK_ELEMENTS, min_heads: int = 1) -> tuple[int, int]:
    """-> (heads per block, queries per block) for the unmasked blocked attention.

    Every block keeps the whole batch (``batch`` rows of ``[heads, queries, kv_len]`` logits), so a
    batch sharded over a mesh stays sharded inside the loop; blocks split heads and queries only.
    ``chunk_size`` given: that many queries per block over all heads. Otherwise blocks of about
    ``block_elements`` logits: all queries when ``min_heads`` heads fit (else a power of two of
    them, at least 8), and as many heads (a divisor of ``heads``) as fit. One block when all fit:
    splitting a block that fits was never faster.
    """
    if chunk_size is not None:
        return heads, max(1, min(int(chunk_size), q_len))
    min_heads = max(1, min(int(min_heads), heads))
    row = batch * kv_len
    if q_len * row * min_heads <= block_elements:
        queries = q_len
    else:
        fit = block_elements // (row * min_heads)
        queries = min(q_len, max(8, 1 << max(0, fit.bit_length() - 1)))
    group = 1
    for g in range(heads, 0, -1):
        if heads % g == 0 and g * queries * row <= block_elements:
            group = g
            break
    return group, queries


def block_plans(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, chunk_size: int | None = None,
                block_elements: int = BLOCK_ELEMENTS) -> tuple[int, int, int, int]:
    """-> (heads, queries) per block of the forward pass, then of the backward pass.

    The backward pass blocks the padded queries on its own: with heads of at most
    :data:`SMALL_HEAD_DIM` its reductions need several heads per block (see ``_backward_block``).
    It keeps the forward plan when its query block would not divide the padded queries.
    """
    group, queries = block_plan(batch, heads, q_len, kv_len, chunk_size, block_elements)
    padded = -(-q_len // queries) * queries
    small = head_dim <= SMALL_HEAD_DIM and chunk_size is None
    backward = block_plan(batch, heads, padded, kv_len, chunk_size, block_elements, min_heads=4 if small else 1)
    return (group, queries, *(backward if padded % backward[1] == 0 else (group, queries)))


def _chunked(q, k, v, mask, scale, upcast, chunk, block_elements=BLOCK_ELEMENTS):
    """Blocks of queries (and, without a mask, of heads) under ``lax.scan``, heads-major layout.

    Each block's logits stay in cache instead of the whole ``[B, H, Lq, Lk]`` going through
    memory once per pass (max, exp, sum, matmul); on XLA:CPU this is several times faster than
    the plain einsum for SD's 32x32-latent self-attention (1024 tokens). Without a mask the
    gradient is the blocked (flash-attention style) backward of :func:`_blocked_attention`; with
    one, autodiff of a scan over query blocks of ``chunk`` (default 64).
    """
    b, q_len, h, d = q.shape
    dtype = q.dtype
    compute = jnp.float32 if upcast else dtype
    if mask is None:
        plans = block_plans(b, h, q_len, k.shape[1], d, chunk, block_elements)
        pad = -q_len % plans[1]
        heads_major = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731  [B, L, H, D] -> [B, H, L, D]
        qh = jnp.pad(heads_major(q.astype(compute) * jnp.asarray(scale, compute)), ((0, 0), (0, 0), (0, pad), (0, 0)))
        out = _blocked_attention(qh, heads_major(k.astype(compute)), heads_major(v.astype(compute)),
                                 plans)
        return out[:, :, :q_len].transpose(0, 2, 1, 3).astype(dtype)
    chunk = 64 if chunk is None else int(chunk)
    if q_len <= chunk:
        return _xla(q, k, v, mask, scale, upcast)
    n = -(-q_len // chunk)
    pad = n * chunk - q_len
    qh = jnp.pad((q.astype(compute) * jnp.asarray(scale, compute)).transpose(0, 2, 1, 3),
                 ((0, 0), (0, 0), (0, pad), (0, 0)))
    qh = qh.reshape(b, h, n, chunk, d).transpose(2, 0, 1, 3, 4)  # [n, B, H, chunk, D]
    kh, vh = k.astype(compute).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, Lk, D]
    mask = jnp.broadcast_to(mask, (b, h, q_len, k.shape[1]))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
    mask = mask.reshape(b, h, n, chunk, k.shape[1]).transpose(2, 0, 1, 3, 4)

    def block(_, xs):
        qq, mm = xs
        logits = jnp.einsum("bhqd,bhkd->bhqk", qq, kh)
        logits = jnp.where(mm, logits, jnp.finfo(logits.dtype).min)
        e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        denom = jnp.sum(e.astype(jnp.float32), axis=-1, keepdims=True)
        out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), vh).astype(jnp.float32) / denom
        return None, out.astype(dtype)

    _, out = jax.lax.scan(block, None, (qh, mask))
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, n * chunk, h, d)  # [B, n*chunk, H, D]
    return out[:, :q_len]


def _bmm(a, b, contract_a: int, contract_b: int):
    """Batched matmul over the leading axis, contracting one axis of each operand."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0,), (0,))))


def _merge_lead(*xs):  # [B, G, ...] -> [B*G, ...]: XLA's YNN fusions of a block run faster on 3-d arrays
    return tuple(x.reshape(-1, *x.shape[2:]) for x in xs)


def _to_blocks(x, heads, queries):  # [B, H, L, ...] -> [H/heads, L/queries, B, heads, queries, ...]
    b, h, length = x.shape[:3]
    x = x.reshape(b, h // heads, heads, length // queries, queries, *x.shape[3:])
    return jnp.moveaxis(x, (1, 3), (0, 1))


def _from_blocks(x):  # inverse of _to_blocks
    n, m, b, heads, queries = x.shape[:5]
    return jnp.moveaxis(x, (0, 1), (1, 3)).reshape(b, n * heads, m * queries, *x.shape[5:])


def _head_groups(x, heads):  # [B, H, Lk, D] -> [H/heads, B, heads, Lk, D]
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // heads, heads, *x.shape[2:]), 1, 0)


def _from_head_groups(x):  # inverse of _head_groups
    n, b, heads = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * heads, *x.shape[3:])


def _forward_block(qq, kk, vv):
    """One block: ``qq [B, G, C, D]`` (scaled) against ``kk, vv [B, G, Lk, D]`` -> (out, logsumexp f32)."""
    lead = qq.shape[:2]
    qq, kk, vv = _merge_lead(qq, kk, vv)
    logits = _bmm(qq, kk, 2, 2)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    denom = jnp.sum(e.astype(jnp.float32), axis=-1, keepdims=True)
    out = _bmm(e, vv, 2, 1).astype(jnp.float32) / denom
    lse = (m.astype(jnp.float32) + jnp.log(denom))[..., 0]
    return out.astype(qq.dtype).reshape(*lead, *out.shape[1:]), lse.reshape(*lead, -1)


def _blocked_forward(qh, kh, vh, heads, queries):
    """-> (out [B,H,Lq,D], logsumexp [B,H,Lq] float32); ``qh`` scaled, Lq a multiple of ``queries``.

    An outer scan over groups of ``heads`` heads, an inner one over blocks of ``queries`` queries
    (each loop dropped when it would run once).
    """
    if heads == qh.shape[1] and queries == qh.shape[2]:
        return _forward_block(qh, kh, vh)

    def group(_, xs):
        qg, kg, vg = xs  # [n_q, B, G, C, D], [B, G, Lk, D], [B, G, Lk, D]
        if qg.shape[0] == 1:
            return None, jax.tree.map(lambda t: t[None], _forward_block(qg[0], kg, vg))
        return None, jax.lax.scan(lambda _, qq: (None, _forward_block(qq, kg, vg)), None, qg)[1]

    _, (out, lse) = jax.lax.scan(group, None, (_to_blocks(qh, heads, queries), _head_groups(kh, heads),
                                               _head_groups(vh, heads)))
    return _from_blocks(out), _from_blocks(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_attention(qh, kh, vh, plan):
    """softmax(qh kh^T) vh over heads-major ``[B, H, L, D]`` arrays, ``qh`` pre-scaled; ``plan`` =
    (heads, queries) per block of the forward pass, then of the backward pass (:func:`block_plans`).

    The backward pass recomputes each block's probabilities from the saved log-sum-exp and
    accumulates dK, dV across a head group's query blocks (as flash attention does). XLA's autodiff
    of the forward scan instead materialises and transposes every block's ``[C, Lk]`` tensors
    several times; this is 1.5-2.5x faster on CPU (measured at 256 and 1024 tokens).
    """
    return _blocked_forward(qh, kh, vh, *plan[:2])[0]


def _blocked_attention_fwd(qh, kh, vh, plan):
    out, lse = _blocked_forward(qh, kh, vh, *plan[:2])
    return out, (qh, kh, vh, out, lse)


def _backward_block(carry, xs, kk, vv):
    """Gradients of one block of ``B x G`` heads x ``C`` queries; dK, dV accumulate in the carry.

    With a small head dimension ``D`` the three products that contract the long axis (dV = P^T dO,
    dQ = dS K, dK = dS^T Q) have only ``D`` output columns, which XLA:CPU's matmuls run at a few
    GFLOP/s; as ``D`` multiply-reduce passes over the block that XLA fuses with the
    probabilities they are 1.3-2.6x faster for D = 16..4. They need several heads per
    block (the backward plan asks for at least 4): with one head of 1024 queries the query-axis
    reductions run 10x slower than the matmuls.
    """
    dk, dv = carry
    lead = dk.shape[:2]
    qq, dd, ll, dl, kk, vv = _merge_lead(*xs, kk, vv)  # [B*G, C, D] x2, [B*G, C] x2, [B*G, Lk, D] x2
    p = jnp.exp(_bmm(qq, kk, 2, 2).astype(jnp.float32) - ll[..., None])  # [B*G, C, Lk]
    dp = _bmm(dd, vv, 2, 2).astype(jnp.float32)
    ds = p * (dp - dl[..., None])
    if qq.shape[-1] <= SMALL_HEAD_DIM:
        f32 = lambda t, i: t[..., i].astype(jnp.float32)  # noqa: E731
        columns = range(qq.shape[-1])
        ddv = jnp.stack([jnp.sum(p * f32(dd, i)[:, :, None], axis=1) for i in columns], axis=-1)
        dq = jnp.stack([jnp.sum(ds * f32(kk, i)[:, None, :], axis=2) for i in columns], axis=-1).astype(qq.dtype)
        ddk = jnp.stack([jnp.sum(ds * f32(qq, i)[:, :, None], axis=1) for i in columns], axis=-1)
    else:
        ddv = _bmm(p.astype(dd.dtype), dd, 1, 1).astype(jnp.float32)
        ds = ds.astype(qq.dtype)
        dq = _bmm(ds, kk, 2, 1)
        ddk = _bmm(ds, qq, 1, 1).astype(jnp.float32)
    split = lambda t: t.reshape(*lead, *t.shape[1:])  # noqa: E731
    return (dk + split(ddk), dv + split(ddv)), split(dq)


def _blocked_attention_bwd(plan, residuals, d_out):
    qh, kh, vh, out, lse = residuals
    heads, queries = plan[2:]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, H, Lq]
    if heads == qh.shape[1] and queries == qh.shape[2]:
        zeros = (jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32))
        (dk, dv), dq = _backward_block(zeros, (qh, d_out, lse, delta), kh, vh)
    else:
        def group(_, xs):
            blocks, kg, vg = xs
            zeros = (jnp.zeros(kg.shape, jnp.float32), jnp.zeros(vg.shape, jnp.float32))
            if blocks[0].shape[0] == 1:
                (dk, dv), dq = _backward_block(zeros, tuple(t[0] for t in blocks), kg, vg)
                return None, (dq[None], dk, dv)
            (dk, dv), dq = jax.lax.scan(lambda c, x: _backward_block(c, x, kg, vg), zeros, blocks)
            return None, (dq, dk, dv)

        blocks = tuple(_to_blocks(t, heads, queries) for t in (qh, d_out, lse, delta))
        _, (dq, dk, dv) = jax.lax.scan(group, None, (blocks, _head_groups(kh, heads), _head_groups(vh, heads)))
        dq, dk, dv = _from_blocks(dq), _from_head_groups(dk), _from_head_groups(dv)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    impl: str = "auto",
    upcast: bool = False,
    chunk_size: int | None = None,
    block_elements: int = BLOCK_ELEMENTS,
) -> jax.Array:
    """Softmax attention.

    Args:
      q: ``[B, Lq, H, D]`` queries; k, v: ``[B, Lk, H, D]``.
      mask: optional boolean, broadcastable to ``[B, H, Lq, Lk]``; True = attend.
      impl: one of :data:`IMPLEMENTATIONS`.
      upcast: compute logits and softmax in float32 (SD v2 does this for fp16 stability).
      chunk_size: queries per block for ``impl="chunked"`` (over all heads); default: without a
        mask, blocks of heads x queries of about ``block_elements`` logits (:func:`block_plan`),
        with one 64 queries.

    Returns:
      ``[B, Lq, H, D]`` in ``q.dtype``.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
    if impl == "auto":  # GPU: fused kernels; CPU: query blocks once the logits outgrow the cache
        backend = jax.default_backend()
        long = q.shape[1] > (64 if chunk_size is None else chunk_size)
        impl = ("dot_product" if backend == "gpu" else "chunked" if long or (backend == "cpu" and mask is None)
                else "xla")
    scale = q.shape[-1] ** -0.5
    if impl == "xla":
        return _xla(q, k, v, mask, scale, upcast)
    if impl == "dot_product":
        return _dot_product(q, k, v, mask, scale, upcast)
    return _chunked(q, k, v, mask, scale, upcast, chunk_size, block_elements)


def causal_mask(length: int) -> jax.Array:
    """``[1, 1, L, L]`` boolean lower-triangular mask (True = attend), for the CLIP text encoder."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]
