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
    q_len = q.shape[1]
    if q_len <= chunk:
        return _xla(q, k, v, mask, scale, upcast)
    n = -(-q_len // chunk)
    pad = n * chunk - q_len
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = qp.reshape(q.shape[0], n, chunk, *q.shape[2:]).swapaxes(0, 1)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q_len, k.shape[1]))
        mp = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
        mc = mp.reshape(*mp.shape[:2], n, chunk, mp.shape[-1]).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda a: _xla(a[0], k, v, a[1], scale, upcast), (qc, mc))
    else:
        out = jax.lax.map(lambda a: _xla(a, k, v, None, scale, upcast), qc)
    out = out.swapaxes(0, 1).reshape(q.shape[0], n * chunk, *q.shape[2:])
    return out[:, :q_len]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    impl: str = "auto",
    upcast: bool = False,
    chunk_size: int = 1024,
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
    if impl == "auto":
        impl = "dot_product" if jax.default_backend() == "gpu" else "xla"
    scale = q.shape[-1] ** -0.5
    if impl == "xla":
        return _xla(q, k, v, mask, scale, upcast)
    if impl == "dot_product":
        return _dot_product(q, k, v, mask, scale, upcast)
    return _chunked(q, k, v, mask, scale, upcast, chunk_size)


def causal_mask(length: int) -> jax.Array:
    """``[1, 1, L, L]`` boolean lower-triangular mask (True = attend), for the CLIP text encoder."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]
