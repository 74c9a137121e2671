"""One scaled dot-product attention function with selectable implementations.

All implementations take and return ``[batch, length, heads, head_dim]`` arrays and agree to
float rounding:

- ``"xla"``: einsum + softmax, the plain reference.
- ``"dot_product"``: ``jax.nn.dot_product_attention`` (XLA on CPU/TPU; cuDNN flash attention on
  GPU when dtypes/shapes allow).
- ``"chunked"``: queries processed in chunks with a ``lax.map``, so memory grows with
  ``chunk * kv_len`` instead of ``q_len * kv_len`` (long sequences, large images).
- ``"auto"``: ``dot_product`` on GPU, ``xla`` elsewhere.
"""
from __future__ import annotations


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


def _chunked(q, k, v, mask, scale, upcast, chunk):
    """Queries in blocks of ``chunk`` under ``lax.scan``, heads-major layout.

    Each block's ``[B, H, chunk, Lk]`` logits stay in cache instead of the whole ``[B, H, Lq, Lk]``
    going through memory once per pass (max, exp, sum, matmul); on XLA:CPU this is ~3.5x faster
    for SD's 32x32-latent self-attention (1024 tokens). Normalising after the value product
    divides ``[chunk, D]`` instead of ``[chunk, Lk]`` numbers.
    """
    b, q_len, h, d = q.shape
    if q_len <= chunk:
        return _xla(q, k, v, mask, scale, upcast)
    dtype = q.dtype
    compute = jnp.float32 if upcast else dtype
    n = -(-q_len // chunk)
    pad = n * chunk - q_len
    qh = jnp.pad((q.astype(compute) * jnp.asarray(scale, compute)).transpose(0, 2, 1, 3),
                 ((0, 0), (0, 0), (0, pad), (0, 0)))
    qh = qh.reshape(b, h, n, chunk, d).transpose(2, 0, 1, 3, 4)  # [n, B, H, chunk, D]
    kh, vh = k.astype(compute).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, Lk, D]
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, h, q_len, k.shape[1]))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
        mask = mask.reshape(b, h, n, chunk, k.shape[1]).transpose(2, 0, 1, 3, 4)

    def block(_, xs):
        qq, mm = xs
        logits = jnp.einsum("bhqd,bhkd->bhqk", qq, kh)
        if mm is not None:
            logits = jnp.where(mm, logits, jnp.finfo(logits.dtype).min)
        e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        denom = jnp.sum(e.astype(jnp.float32), axis=-1, keepdims=True)
        out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), vh).astype(jnp.float32) / denom
        return None, out.astype(dtype)

    _, out = jax.lax.scan(block, None, (qh, mask))
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, n * chunk, h, d)  # [B, n*chunk, H, D]
    return out[:, :q_len]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    impl: str = "auto",
    upcast: bool = False,
    chunk_size: int = 64,
) -> jax.Array:
    """Softmax attention.

    Args:
      q: ``[B, Lq, H, D]`` queries; k, v: ``[B, Lk, H, D]``.
      mask: optional boolean, broadcastable to ``[B, H, Lq, Lk]``; True = attend.
      impl: one of :data:`IMPLEMENTATIONS`.
      upcast: compute logits and softmax in float32 (SD v2 does this for fp16 stability).
      chunk_size: query chunk length for ``impl="chunked"``.

    Returns:
      ``[B, Lq, H, D]`` in ``q.dtype``.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
    if impl == "auto":  # GPU: fused kernels; CPU: query blocks once the logits outgrow the cache
        impl = "dot_product" if jax.default_backend() == "gpu" else "chunked" if q.shape[1] > chunk_size else "xla"
    scale = q.shape[-1] ** -0.5
    if impl == "xla":
        return _xla(q, k, v, mask, scale, upcast)
    if impl == "dot_product":
        return _dot_product(q, k, v, mask, scale, upcast)
    return _chunked(q, k, v, mask, scale, upcast, chunk_size)


def causal_mask(length: int) -> jax.Array:
    """``[1, 1, L, L]`` boolean lower-triangular mask (True = attend), for the CLIP text encoder."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]
