"""YNNPACK compiler options: the mapping, its errors, and that a jitted conv + grad compiled with them
gives XLA's own values on the CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ldm_jax import xla_cpu


def test_names_map_to_xla_fusion_types():
    opts = xla_cpu.compiler_options(("reduce", "dot"), backend="cpu")
    assert opts == {xla_cpu.YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    assert xla_cpu.compiler_options("dot, eltwise", backend="cpu") == {
        xla_cpu.YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}


@pytest.mark.parametrize("fusions", [None, (), "", ["  "]])
def test_nothing_asked_gives_no_options(fusions):
    assert xla_cpu.compiler_options(fusions, backend="cpu") is None


def test_other_backends_get_no_options():
    assert xla_cpu.compiler_options(("dot",), backend="gpu") is None
    assert xla_cpu.compiler_options(("dot",), backend="tpu") is None


def test_unknown_fusion_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown YNNPACK fusion"):
        xla_cpu.compiler_options(("dot", "conv3d"), backend="cpu")


def test_ynn_compiled_conv_and_gradients_match_xla():
    """The options reach XLA (the compiled HLO holds a YNN fusion) and change no values."""
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 8))
    w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16)) * 0.1

    def f(x, w):
        y = jax.nn.silu(lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return jnp.sum(y ** 2), y

    def run(opts):
        fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True), compiler_options=opts)
        return fn, fn(x, w)

    opts = xla_cpu.compiler_options(tuple(xla_cpu.YNN_FUSION_TYPES))
    fn, ours = run(opts)
    _, ref = run(None)
    assert "ynn_fusion" in fn.lower(x, w).compile().as_text()
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
