"""TPU flash attention: ``dot_product_attention(impl="pallas")``.

Runs the Pallas TPU kernel of :mod:`jax.experimental.pallas.ops.tpu.flash_attention` (heads-major
``[B, H, L, D]``) on ``[B, L, H, D]`` arrays, forward and backward, for Stable Diffusion's shapes:

- **Head dim**: the kernel takes ``D <= 128`` as is and larger ``D`` only in multiples of 128, so
  ``D = 160`` (SD 1's deepest blocks: 1280 channels / 8 heads) is zero-padded to 256
  (:func:`padded_head_dim`). Zero columns change neither ``q.k`` nor the weighted sum of ``v``; the
  scale stays ``D ** -0.5`` of the true ``D`` and the output is sliced back. ``D = 40, 64, 80``
  compile unpadded (checked for v4, v5e, v5p and v6e).
- **Lengths**: the kernel's query and key blocks are multiples of 128 and must divide the
  (padded) lengths in the backward pass, so queries and keys are zero-padded to a multiple of 128
  (:func:`padded_length`): 77 text tokens -> 128, 4096 latent pixels stay 4096. Padded query
  rows are sliced off (their output gradient is zero, so they add nothing to dK, dV).
- **Masks** (:func:`mask_kind`), most to least efficient, all differentiable:

  * none: padded keys, if any, are masked with the kernel's ``segment_ids`` (queries id 1, real
    keys 1, padded keys 0), which costs two int vectors;
  * a per-key mask (shape ``[B or 1, 1, 1, Lk]``, e.g. key padding): the same ``segment_ids``, with
    masked keys id 0;
  * the causal mask of :func:`ldm_jax.models.attention.causal_mask` (CLIP's text encoder), when the
    mask is a concrete (numpy) array: the kernel's ``causal=True`` (it skips blocks above the
    diagonal; padded keys lie above it for every real query);
  * any other boolean mask: the kernel's additive bias ``ab`` (``[B, H, Lq, Lk]`` bfloat16: 0,
    :data:`MASKED`, or :data:`PADDED` for padded keys; padded queries attend to the real keys).
    This materialises ``Lq x Lk`` per head like plain attention does, and the backward pass
    writes its gradient (discarded) of the same size.

  A query row with no key to attend to (not SD's case) is finite but differs from ``"xla"``'s
  uniform average: with the bias it attends as if unmasked, with ``segment_ids`` it averages the
  padded keys too.
- **Precision**: the kernel always takes ``q.k`` and the softmax in float32 (``dot`` with float32
  accumulation, float32 ``exp``), and multiplies ``softmax`` in ``v``'s dtype by ``v``: what
  ``upcast=True`` asks for, whatever ``upcast`` says. Its dots in bfloat16 are traced at the
  default matmul precision whatever ``jax_default_matmul_precision`` says (Mosaic rejects
  "highest" on bfloat16); float16 inputs run in float32 (Mosaic rejects float16 tiles).
- **Blocks** (:func:`block_sizes`): the largest of 512, 256, 128 dividing the padded length, for
  queries and keys and in all three kernels (forward, dK/dV, dQ). 512 x 512 float32 logits are
  1 MiB of VMEM per temporary.
- **Sharding**: XLA's SPMD partitioner cannot split a Mosaic kernel ("Mosaic kernels cannot be
  automatically partitioned"), and ``custom_partitioning`` does not reach TPU compilation (jax
  issue 38196: "Custom emitter for CustomSPMDPartitioning not found"). So when the program is
  partitioned over a known mesh, the kernel runs under ``jax.shard_map`` on each device's slice
  of batch x heads (:func:`split_axes`); the mesh is the one set with ``jax.set_mesh`` around
  tracing or, for attention applied directly to ``jax.jit`` arguments, their ``NamedSharding``'s.
  Without either, the kernel is called as is: right on one device; in a program partitioned over
  several, compilation fails with the error above (set the mesh).
- **Interpret mode** (tests, CPU): under :func:`pallas_interpret` the same kernels run through
  Pallas' interpreter (``interpret=True``: each grid step as XLA ops, on any backend); outside it
  they compile with Mosaic, which only a TPU backend (or an ahead-of-time TPU topology) can do.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as _fa
from jax.sharding import PartitionSpec as P

# Sequence blocks are multiples of this (the kernel's MIN_BLOCK_SIZE / NUM_LANES).
LANES = 128
# Largest query/key block: 512 x 512 float32 logits per temporary (1 MiB) fit any TPU's VMEM.
MAX_BLOCK = 512
# Additive bias (before the scale, in float32) for masked keys, and for padded keys in the bias path.
# Large enough that exp(bias * scale) is 0 next to any real logit (|q.k| is far below 1e5 in SD),
# small enough that q.k + bias keeps q.k's digits: with the kernel's own -0.7 * float32 max, a row
# with every key masked (a padded query) gets logits that differ only by rounding, ~1e31 apart
# between its recomputations, and its softmax overflows to inf / NaN gradients.
MASKED = -1e6
PADDED = -1e7


@contextlib.contextmanager
def pallas_interpret():
    """Run ``impl="pallas"`` (and every Pallas TPU kernel traced inside) in interpret mode.

    For tests and debugging on CPU: Pallas' generic interpreter (``interpret=True``) runs each grid
    step of the kernels as ordinary XLA ops, on any backend and with sharded inputs. Functions
    jitted outside and called inside are traced again (the setting is part of jit's cache key).
    """
    with pltpu.force_tpu_interpret_mode(True):
        yield


def padded_head_dim(d: int) -> int:
    """Head dim the kernel takes: ``d`` up to 128, else the next multiple of 128 (160 -> 256)."""
    return d if d <= LANES else -(-d // LANES) * LANES


def padded_length(n: int) -> int:
    """Sequence length the kernel's blocks tile: the next multiple of 128 (77 -> 128, 200 -> 256)."""
    return -(-n // LANES) * LANES


def _block(n: int) -> int:
    return next(b for b in (MAX_BLOCK, 256, LANES) if n % b == 0)


def block_sizes(q_len: int, kv_len: int) -> _fa.BlockSizes:
    """Kernel tiles for padded lengths (multiples of 128): the largest of 512, 256, 128 that
    divides each, the same in the forward, dK/dV and dQ kernels."""
    bq, bk = _block(q_len), _block(kv_len)
    return _fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                          block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                          block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)


def _concrete(x) -> bool:
    return isinstance(x, (np.ndarray, np.bool_, bool)) or (
        isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer))


def mask_kind(mask, q_len: int, kv_len: int) -> str:
    """How the kernel applies ``mask``: ``"none"``, ``"keys"`` (one flag per key, shared by all
    heads and queries: ``segment_ids``), ``"causal"`` (a concrete lower-triangular mask, shared by
    the batch and heads: ``causal=True``) or ``"bias"`` (anything else: the additive bias)."""
    if mask is None:
        return "none"
    shape = (1,) * (4 - np.ndim(mask)) + tuple(np.shape(mask))
    if shape[1] == 1 and shape[2] == 1:
        return "keys"
    if (q_len == kv_len and shape[:2] == (1, 1) and shape[2:] == (q_len, kv_len) and _concrete(mask)
            and np.array_equal(np.asarray(mask).reshape(q_len, kv_len), np.tri(q_len, dtype=bool))):
        return "causal"
    return "bias"


# Mesh axes that split heads rather than the batch when both would divide (tensor parallelism
# shards the q/k/v projections' output features, i.e. the heads, over this repo's "tensor" axis).
HEAD_AXES = ("tensor",)


def _context_mesh(*arrays):
    """The mesh a traced program is partitioned over, if known: the one set by ``jax.set_mesh`` or,
    failing that, the one of an operand that is itself a ``jax.jit`` argument with a
    ``NamedSharding`` (intermediates do not carry it). None when unknown or single-device."""
    meshes = [jax.sharding.get_abstract_mesh()]
    for a in arrays:
        meshes.append(getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None))
    for mesh in meshes:
        if mesh is not None and not mesh.empty:
            # inside shard_map (manual axes) the arrays are already per-device slices
            manual = jax.sharding.AxisType.Manual in mesh.axis_types
            return None if manual or mesh.size == 1 else mesh
    return None


def split_axes(mesh, batch: int, heads: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """-> (mesh axes splitting the batch, mesh axes splitting the heads) for :func:`flash_attention`.

    Every mesh axis of size > 1 goes to the batch
    (heads first for :data:`HEAD_AXES`), or to the other dimension when it does not divide what is
    left; an axis dividing neither is not split (each of its devices computes the whole). Lengths
    and the head dim are never split.
    """
    b_axes, h_axes, b_left, h_left = [], [], batch, heads
    for name, size in zip(mesh.axis_names, mesh.axis_sizes):
        if size == 1:
            continue
        order = ("h", "b") if name in HEAD_AXES else ("b", "h")
        for dim in order:
            if dim == "b" and b_left % size == 0:
                b_axes.append(name)
                b_left //= size
                break
            if dim == "h" and h_left % size == 0:
                h_axes.append(name)
                h_left //= size
                break
    return tuple(b_axes), tuple(h_axes)


def _kernel(qh, kh, vh, extras, causal, scale, blocks):
    ab, seg = None, None
    if len(extras) == 1:
        ab = extras[0]
    elif len(extras) == 2:
        seg = _fa.SegmentIds(*extras)
    return _fa.flash_attention(qh, kh, vh, ab, seg, causal=causal, sm_scale=scale, block_sizes=blocks)


def _default_precision_kernel(kernel, n_extras: int):
    """``kernel(qh, kh, vh, extras)`` traced, forward and backward, at the default matmul precision.

    The kernels' dots take the ambient ``jax_default_matmul_precision``; "highest" (which the tests
    and ``--precision`` runs set) makes Mosaic reject bfloat16 operands ("Bad lhs type": a float32
    contraction of bfloat16 vectors). Half-precision products are exact in float32 accumulation
    anyway. A custom_vjp so that the kernel's own backward, traced when the gradient is taken, gets
    the setting too.
    """
    @jax.custom_vjp
    def run(qh, kh, vh, extras):
        with jax.default_matmul_precision("default"):
            return kernel(qh, kh, vh, extras)

    def run_fwd(qh, kh, vh, extras):
        with jax.default_matmul_precision("default"):
            out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, extras), qh, kh, vh)
        return out, vjp

    def run_bwd(vjp, d_out):
        with jax.default_matmul_precision("default"):
            return (*vjp(d_out), (None,) * n_extras)

    run.defvjp(run_fwd, run_bwd)
    return run


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask=None, scale: float | None = None) -> jax.Array:
    """Softmax attention of ``[B, L, H, D]`` arrays through the TPU flash attention kernel.

    ``mask``: boolean, broadcastable to ``[B, H, Lq, Lk]``, True = attend (see :func:`mask_kind`);
    ``scale`` defaults to ``D ** -0.5``. Returns ``[B, Lq, H, D]`` in ``q.dtype``.
    """
    b, q_len, h, d = q.shape
    kv_len = k.shape[1]
    scale = d ** -0.5 if scale is None else float(scale)
    dtype = q.dtype
    mesh = _context_mesh(q, k, v)  # before any op: only jit arguments carry their mesh
    if dtype == jnp.float16:  # Mosaic rejects float16 tiles ("Invalid vector type for load"); exact in f32
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    kind = mask_kind(mask, q_len, kv_len)
    dp, qp, kp = padded_head_dim(d), padded_length(q_len), padded_length(kv_len)

    def heads_major(t, length):  # [B, L, H, D] -> [B, H, L_padded, D_padded], zeros appended
        return jnp.pad(t.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, length - t.shape[1]), (0, dp - d)))

    qh, kh, vh = heads_major(q, qp), heads_major(k, kp), heads_major(v, kp)
    extras: tuple = ()
    if kind == "bias":
        bias = jnp.where(jnp.broadcast_to(jnp.asarray(mask, bool), (b, h, q_len, kv_len)), 0, MASKED)
        bias = jnp.pad(bias.astype(jnp.bfloat16), ((0, 0), (0, 0), (0, qp - q_len), (0, 0)))
        extras = (jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, kp - kv_len)), constant_values=PADDED),)
    elif kind == "keys" or (kind == "none" and kp > kv_len):
        keys = jnp.ones((b, kv_len), jnp.int32)
        if kind == "keys":
            keys = jnp.broadcast_to(jnp.asarray(mask, bool).reshape(-1, kv_len), (b, kv_len)).astype(jnp.int32)
        extras = (jnp.ones((b, qp), jnp.int32), jnp.pad(keys, ((0, 0), (0, kp - kv_len))))
    kernel = functools.partial(_kernel, causal=kind == "causal", scale=scale, blocks=block_sizes(qp, kp))
    if mesh is not None:
        b_axes, h_axes = split_axes(mesh, b, h)
        if b_axes or h_axes:
            bh, bb = P(b_axes or None, h_axes or None), P(b_axes or None)
            extras_specs = (bh,) if len(extras) == 1 else (bb,) * len(extras)  # bias, or segment ids
            kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(bh, bh, bh, extras_specs), out_specs=bh,
                                   check_vma=False)
    if q.dtype != jnp.float32:
        kernel = _default_precision_kernel(kernel, len(extras))
    out = kernel(qh, kh, vh, extras)
    return out[:, :, :q_len, :d].transpose(0, 2, 1, 3).astype(dtype)
