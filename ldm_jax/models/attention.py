"""One scaled dot-product attention function with selectable implementations.

All implementations take and return ``[batch, length, heads, head_dim]`` arrays and agree to
float rounding:

- ``"xla"``: einsum + softmax, the plain reference.
- ``"dot_product"``: ``jax.nn.dot_product_attention``. On a CUDA GPU it asks for cuDNN's fused
  (flash) attention whenever cuDNN takes the call (:func:`cudnn_unsupported_reason`: fp16/bf16
  without ``upcast``, a head dim that is a multiple of 8 up to 128, or 256 from Hopper on, even
  lengths with a non-causal mask), and for XLA otherwise; on CPU and TPU it is XLA. (Left to
  itself, ``jax.nn.dot_product_attention`` picks XLA everywhere.)
- ``"chunked"``: blocks of queries (and, without a mask, of heads) under ``lax.scan``, so memory
  grows with the block instead of ``q_len * kv_len`` (long sequences, large images), with a
  blocked custom backward when there is no mask. Every block holds the whole batch, so a batch
  sharded over a mesh stays on its devices (:func:`block_plan`).
- ``"pallas"``: the Pallas TPU flash attention kernel (:mod:`ldm_jax.models.pallas_attention`),
  forward and backward: the ``[Lq, Lk]`` logits live in VMEM one block at a time and never reach
  HBM. TPU only (Mosaic); elsewhere it runs under :func:`pallas_interpret` (tests). In a program
  partitioned over several devices it needs the mesh in scope (``jax.set_mesh``) to run per device.
- ``"auto"``: ``dot_product`` on GPU (so cuDNN where it applies); on TPU ``pallas`` where
  :func:`tpu_uses_pallas` says it pays (self-attention over at least :data:`PALLAS_MIN_KV_LEN`
  keys: SD's 64x64 and 32x32 latents, whose logits dominate memory and HBM traffic) and the kernel
  can be placed (:func:`pallas_placeable`); otherwise ``chunked`` for sequences longer than
  ``chunk_size`` (64), and on CPU for any unmasked one (its custom backward is the faster one
  there at every length); ``xla`` otherwise.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "dot_product", "chunked", "pallas")

# "auto" on TPU: the Pallas flash kernel for self-attention over at least this many keys. From 32x32
# latents (1024 tokens) up, SD's [B, H, L, L] logits are the largest activations of the UNet
# (4096 tokens: 64 MiB per image and head in float32) and plain attention is bound by moving them
# through HBM; below, they are small and the kernel's padding to 128-token blocks (77 text tokens,
# 8x8 = 64 latents) and per-block overhead buy little. Not yet timed on a TPU: tune here.
PALLAS_MIN_KV_LEN = 1024


def _xla(q, k, v, mask, scale, upcast):
    dtype = q.dtype
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32) if upcast else logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v).astype(dtype)


def cudnn_unsupported_reason(q, k, v, mask=None, upcast: bool = False, *,
                             compute_capability: tuple[int, int] | None = None,
                             cudnn_version: int | None = None) -> str | None:
    """Why ``jax.nn.dot_product_attention(implementation="cudnn")`` would reject this call of
    :func:`dot_product_attention` (forward or backward), or None when cuDNN takes it.

    Pure: looks at shapes and dtypes only (arrays or ``jax.ShapeDtypeStruct``). Mirrors jax 0.10's
    ``check_layout`` and ``check_is_flash_attention`` (``jax/_src/cudnn/fused_attention_stablehlo.py``)
    for the calls made here (``[B, L, H, D]``, one head count, a boolean mask as cuDNN's bias):

    - ``upcast``: asks for float32 logits and softmax from float32 inputs, which cuDNN does not take;
    - q, k, v float16 or bfloat16, all three the same;
    - head dim a multiple of 8 and at most 128, or 256 on compute capability >= 9.0 (Hopper);
      ``compute_capability`` None (unknown): the pre-Hopper limit;
    - compute capability 10.3 needs cuDNN >= 9.11 (``cudnn_version`` as cuDNN reports it: 91100);
    - a mask other than the concrete causal one of :func:`causal_mask` (which becomes cuDNN's
      causal mask type instead of a bias): even query and key lengths, which cuDNN's bias
      gradient needs.
    """
    if upcast:
        return "upcast=True: float32 logits and softmax from float32 inputs; cuDNN takes fp16/bf16"
    dtypes = {jnp.dtype(t.dtype) for t in (q, k, v)}
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: cuDNN takes float16 or bfloat16, all three the same"
    if len(q.shape) != 4 or len(k.shape) != 4 or k.shape != v.shape:
        return f"shapes {q.shape}, {k.shape}, {v.shape}: [B, L, H, D] with k and v alike"
    head_dim = q.shape[-1]
    hopper = compute_capability is not None and tuple(compute_capability) >= (9, 0)
    limit = 256 if hopper else 128
    if head_dim % 8 or head_dim > limit:
        return (f"head dim {head_dim}: cuDNN takes multiples of 8 up to {limit} on compute capability "
                f"{compute_capability}")
    if (compute_capability is not None and tuple(compute_capability) == (10, 3) and cudnn_version is not None
            and cudnn_version < 91100):
        return f"compute capability 10.3 needs cuDNN >= 9.11, have {cudnn_version}"
    if mask is not None and not _is_causal(mask, q.shape[1], k.shape[1]) and (q.shape[1] % 2 or k.shape[1] % 2):
        return f"lengths {q.shape[1]}, {k.shape[1]} with a mask: cuDNN's bias gradient needs even lengths"
    return None


def _is_causal(mask, q_len: int, kv_len: int) -> bool:
    """``mask`` is the concrete lower-triangular mask of :func:`causal_mask` (shared by batch and heads)."""
    shape = (1,) * (4 - np.ndim(mask)) + tuple(np.shape(mask))
    if q_len != kv_len or shape != (1, 1, q_len, kv_len) or isinstance(mask, jax.core.Tracer):
        return False
    return bool(np.array_equal(np.asarray(mask).reshape(q_len, kv_len), np.tri(q_len, dtype=bool)))


def _cuda_gpu() -> tuple[tuple[int, int], int] | None:
    """(compute capability, cuDNN version) when tracing for a CUDA GPU with cuDNN, else None."""
    if current_platform() != "gpu" or jax.default_backend() != "gpu":
        return None  # CPU/TPU, or an ahead-of-time trace for a GPU this process cannot query
    device = jax.devices()[0]
    if "cuda" not in str(getattr(device.client, "platform_version", "")).lower():
        return None  # ROCm: no cuDNN
    try:
        from jax._src.lib import cuda_versions
        version = cuda_versions.cudnn_get_version() if cuda_versions is not None else None
    except (ImportError, AttributeError):
        version = None
    if version is None:
        return None
    major, minor = (int(x) for x in str(device.compute_capability).split(".")[:2])
    return (major, minor), int(version)


def _dot_product(q, k, v, mask, scale, upcast):
    dtype = q.dtype
    gpu = _cuda_gpu()
    if gpu is not None and cudnn_unsupported_reason(q, k, v, mask, upcast, compute_capability=gpu[0],
                                                    cudnn_version=gpu[1]) is None:
        causal = mask is not None and _is_causal(mask, q.shape[1], k.shape[1])
        if mask is not None and not causal:  # cuDNN's bias takes [B or 1, H or 1, Lq, Lk]
            mask = jnp.asarray(mask, bool)
            mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
            mask = jnp.broadcast_to(mask, (*mask.shape[:2], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=None if causal else mask, scale=scale,
                                            is_causal=causal, implementation="cudnn")
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    return out.astype(dtype)


def _pallas(q, k, v, mask, scale, upcast):
    from ldm_jax.models import pallas_attention

    del upcast  # the kernel takes logits and softmax in float32 anyway
    return pallas_attention.flash_attention(q, k, v, mask, scale)


def pallas_interpret():
    """Context manager: ``impl="pallas"`` runs the Pallas kernels in interpret mode (plain XLA ops
    per grid step, any backend), for tests on CPU; without it they compile for TPU with Mosaic.
    See :func:`ldm_jax.models.pallas_attention.pallas_interpret`."""
    from ldm_jax.models import pallas_attention

    return pallas_attention.pallas_interpret()


def tpu_uses_pallas(q_len: int, kv_len: int, head_dim: int, mask=None) -> bool:
    """Whether ``impl="auto"`` on TPU takes the Pallas flash kernel: self-attention (``q_len ==
    kv_len``) over at least :data:`PALLAS_MIN_KV_LEN` keys, with no mask or one the kernel applies
    without an ``[Lq, Lk]`` bias (per-key, or the concrete causal mask; see
    :func:`ldm_jax.models.pallas_attention.mask_kind`). SD's 77-token cross-attention and its
    short self-attention stay on the XLA paths. ``head_dim`` does not count yet: every SD head
    dim (40, 64, 80, and 160 padded to 256) should gain at these lengths.
    """
    del head_dim
    if q_len != kv_len or kv_len < PALLAS_MIN_KV_LEN:
        return False
    if mask is None:
        return True
    from ldm_jax.models.pallas_attention import mask_kind

    return mask_kind(mask, q_len, kv_len) != "bias"


def pallas_placeable(*arrays) -> bool:
    """Whether the Pallas kernel can run in the program being traced: XLA cannot partition a Mosaic
    kernel by itself, so either the mesh is known (``jax.set_mesh``, or ``arrays`` are ``jax.jit``
    arguments with a ``NamedSharding``: the kernel then runs under ``shard_map``) or the trace is
    for this process's backend and it has one device."""
    from ldm_jax.models.pallas_attention import _context_mesh

    if _context_mesh(*arrays) is not None:
        return True
    return current_platform() == jax.default_backend() and jax.device_count() == 1


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
      impl: one of :data:`IMPLEMENTATIONS` (see the module docstring).
      upcast: compute logits and softmax in float32 (SD v2 does this for fp16 stability); the
        ``"pallas"`` kernel always does.
      chunk_size: queries per block for ``impl="chunked"`` (over all heads); default: without a
        mask, blocks of heads x queries of about ``block_elements`` logits (:func:`block_plan`),
        with one 64 queries.

    Returns:
      ``[B, Lq, H, D]`` in ``q.dtype``.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
    if impl == "auto":  # GPU: fused kernels; TPU: flash kernel for long self-attention; CPU: query blocks
        backend = current_platform()
        long = q.shape[1] > (64 if chunk_size is None else chunk_size)
        if backend == "gpu":
            impl = "dot_product"
        elif (backend == "tpu" and tpu_uses_pallas(q.shape[1], k.shape[1], q.shape[-1], mask)
              and pallas_placeable(q, k, v)):
            impl = "pallas"
        else:
            impl = "chunked" if long or (backend == "cpu" and mask is None) else "xla"
    scale = q.shape[-1] ** -0.5
    if impl == "xla":
        return _xla(q, k, v, mask, scale, upcast)
    if impl == "dot_product":
        return _dot_product(q, k, v, mask, scale, upcast)
    if impl == "pallas":
        return _pallas(q, k, v, mask, scale, upcast)
    return _chunked(q, k, v, mask, scale, upcast, chunk_size, block_elements)


_TARGET: list[str] = []  # the platform a trace is for, when not the default backend's (target_platform)


@contextlib.contextmanager
def target_platform(platform: str):
    """Trace for ``platform`` (``"tpu"``, ``"gpu"``, ``"cpu"``): ``impl="auto"`` picks that platform's
    implementation. For ahead-of-time compiles on other devices than the default backend's (a TPU
    topology planned on a CPU machine, :mod:`ldm_jax.plan`)."""
    _TARGET.append(platform)
    try:
        yield
    finally:
        _TARGET.pop()


def on_mesh(fn, mesh):
    """``fn`` traced with ``mesh`` as the abstract mesh in scope, for ``jax.jit``: the Pallas kernel,
    which XLA cannot partition, then finds the mesh and runs per device under ``shard_map`` (what
    ``"auto"`` needs to pick it on a multi-chip TPU). Nothing else in the trace changes."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def current_platform() -> str:
    """The platform ``impl="auto"`` chooses for: the innermost :func:`target_platform`, else JAX's default backend."""
    return _TARGET[-1] if _TARGET else jax.default_backend()


def causal_mask(length: int) -> np.ndarray:
    """``[1, 1, L, L]`` boolean lower-triangular mask (True = attend), for the CLIP text encoder.

    A numpy array, so it stays concrete inside ``jax.jit``: ``impl="pallas"`` and cuDNN recognise
    it and use their built-in causal masking (which skips the blocks above the diagonal) instead of
    an ``[L, L]`` bias.
    """
    return np.tri(length, dtype=bool)[None, None]
