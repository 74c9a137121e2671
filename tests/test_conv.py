"""The CPU tap-matmul kernel gradient (``set_kernel_grad_mode("taps")``, the CPU tuning's
``LDM_JAX_CONV_KERNEL_GRAD=taps``) equals XLA's convolution gradient (values and input grads); by
default XLA's own gradient is used."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ldm_jax.models import conv
from ldm_jax.models.conv import conv_general_dilated

DN = lax.conv_dimension_numbers((1, 8, 8, 3), (3, 3, 3, 4), ("NHWC", "HWIO", "NHWC"))


@pytest.fixture
def taps():
    conv.set_kernel_grad_mode("taps")
    yield
    conv.set_kernel_grad_mode("xla")


def _has_custom_vjp(fn, *args) -> bool:
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("kernel,stride,padding", [
    (3, 1, ((1, 1), (1, 1))), (3, 2, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))), (1, 1, ((0, 0), (0, 0))),
    (4, 2, ((1, 1), (1, 1))), (3, 1, "SAME"), (3, 2, "VALID"), (3, 1, ((-1, 2), (2, -1))),
])
def test_gradients_match_xla(kernel, stride, padding, taps):
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 11, 9, 5))
    w = jax.random.normal(kw, (kernel, kernel, 5, 6))

    def run(conv):
        def f(x, w):
            return conv(x, w, (stride, stride), padding, dimension_numbers=DN)
        y, vjp = jax.vjp(f, x, w)
        dy = jax.random.normal(kd, y.shape)
        return (y, *vjp(dy))

    assert _has_custom_vjp(lambda x, w: conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DN),
                           x, w)
    ours = jax.jit(lambda x, w: run(conv_general_dilated))(x, w)
    ref = jax.jit(lambda x, w: run(lax.conv_general_dilated))(x, w)
    for a, b, name in zip(ours, ref, ("y", "dx", "dw")):
        assert a.shape == b.shape, name
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6 * scale, rtol=0, err_msg=name)


def test_grouped_and_dilated_fall_back_to_lax(taps):
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    w = jax.random.normal(jax.random.key(2), (3, 3, 2, 4))
    y = conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN, feature_group_count=2)
    ref = lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN,
                                   feature_group_count=2)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


def test_bf16_weight_grad_keeps_dtype(taps):
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(4), (3, 3, 4, 4), jnp.bfloat16)
    g = jax.grad(lambda w: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
                 .astype(jnp.float32).sum())(w)
    ref = jax.grad(lambda w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
                   .astype(jnp.float32).sum())(w)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=0.5)


def test_default_is_xla_own_gradient():
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 3))
    w = jax.random.normal(jax.random.key(6), (3, 3, 3, 4))
    def f():  # a new function each time: the mode is read when a function is traced
        return lambda x, w: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)

    assert conv.kernel_grad_mode() == "xla"
    assert not _has_custom_vjp(f(), x, w)
    try:
        conv.set_kernel_grad_mode("taps")
        assert _has_custom_vjp(f(), x, w)
    finally:
        conv.set_kernel_grad_mode("xla")
    assert not _has_custom_vjp(f(), x, w)


def test_unknown_kernel_grad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="LDM_JAX_CONV_KERNEL_GRAD"):
        conv.set_kernel_grad_mode("winograd")
    assert conv.kernel_grad_mode() == "xla"  # unchanged
