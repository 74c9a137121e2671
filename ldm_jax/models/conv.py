"""A drop-in ``conv_general_dilated`` for ``flax.linen.Conv`` with an optional tap-matmul kernel gradient.

How fast XLA:CPU runs a 2-D convolution's gradient with respect to its *kernel* depends on the CPU:
on some it is many times slower than the forward convolution, and one matmul per kernel tap,
``dW[i, j] = sum_{n,h,w} x_pad[n, h*s+i, w*s+j, :]^T dy[n, h, w, :]``, is faster; on others XLA's
own gradient wins, and only XLA's own convolutions join YNNPACK fusions. So XLA's lowering is the
default and the taps are a CPU tuning choice (:func:`set_kernel_grad_mode`, which
:func:`ldm_jax.runtime.enable_cpu_tuning` sets from ``LDM_JAX_CONV_KERNEL_GRAD``); the mode in
force when a function is traced applies to it. Both give the same values to float32 rounding. On
GPU and TPU the stock lowering is always used.

Usage: ``nn.Conv(..., conv_general_dilated=conv_general_dilated)``; parameters are unchanged.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated", "conv2d_taps_weight_grad", "set_kernel_grad_mode", "kernel_grad_mode"]

_MODES = ("xla", "taps")
_mode = {"kernel_grad": "xla"}


def set_kernel_grad_mode(mode: str) -> None:
    """``"xla"`` (default) or ``"taps"``: the CPU kernel gradient of functions traced from now on."""
    mode = (mode or "xla").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"the convolution kernel gradient (LDM_JAX_CONV_KERNEL_GRAD) must be one of {_MODES}, "
                         f"got {mode!r}")
    _mode["kernel_grad"] = mode


def kernel_grad_mode() -> str:
    return _mode["kernel_grad"]


def _is_nhwc_hwio(dimension_numbers, ndim: int) -> bool:
    if ndim != 4 or dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, dimension_numbers) \
        if not isinstance(dimension_numbers, lax.ConvDimensionNumbers) else dimension_numbers
    return tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1) \
        and tuple(dn.out_spec) == (0, 3, 1, 2)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """Same signature and result as ``lax.conv_general_dilated``; in the ``"taps"`` mode,
    NHWC/HWIO 2-D convolutions without dilation or groups take the tap-matmul kernel gradient on the
    CPU backend."""
    use_taps = (_is_nhwc_hwio(dimension_numbers, lhs.ndim) and feature_group_count == 1 and batch_group_count == 1
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and preferred_element_type is None and jax.default_backend() == "cpu" and kernel_grad_mode() == "taps")
    if not use_taps:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count,
                                        precision, preferred_element_type)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_nhwc(lhs, rhs, tuple(int(s) for s in window_strides), padding, precision)


def _forward(x, w, strides, padding, precision):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_nhwc(x, w, strides, padding, precision):
    return _forward(x, w, strides, padding, precision)


def _conv_nhwc_fwd(x, w, strides, padding, precision):
    return _forward(x, w, strides, padding, precision), (x, w)


def _conv_nhwc_bwd(strides, padding, precision, residuals, dy):
    x, w = residuals
    (dx,) = jax.linear_transpose(lambda x_: _forward(x_, w, strides, padding, precision), x)(dy)
    return dx, conv2d_taps_weight_grad(x, dy, w.shape, strides, padding).astype(w.dtype)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def conv2d_taps_weight_grad(x, dy, kernel_shape: Sequence[int], strides: Sequence[int],
                            padding: Sequence[tuple[int, int]]):
    """Kernel gradient of an NHWC/HWIO convolution: x [N,H,W,Cin], dy [N,Ho,Wo,Cout] ->
    float32 [kh, kw, Cin, Cout], one ``[Cin, N*Ho*Wo] @ [N*Ho*Wo, Cout]`` matmul per tap."""
    kh, kw = int(kernel_shape[0]), int(kernel_shape[1])
    (plo_h, phi_h), (plo_w, phi_w) = padding
    # negative padding (cropping) is legal in lax; pad with max(0, .) and crop by the slice start
    xp = jnp.pad(x, ((0, 0), (max(plo_h, 0), max(phi_h, 0)), (max(plo_w, 0), max(phi_w, 0)), (0, 0)))
    off_h, off_w = max(-plo_h, 0), max(-plo_w, 0)
    n, ho, wo, _ = dy.shape
    sh, sw = strides
    taps = []
    for i in range(kh):
        for j in range(kw):
            start = (0, off_h + i, off_w + j, 0)
            limit = (n, off_h + i + (ho - 1) * sh + 1, off_w + j + (wo - 1) * sw + 1, x.shape[-1])
            xs = lax.slice(xp, start, limit, (1, sh, sw, 1))
            taps.append(lax.dot_general(xs, dy, (((0, 1, 2), (0, 1, 2)), ((), ())),
                                        preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(kh, kw, x.shape[-1], dy.shape[-1])
