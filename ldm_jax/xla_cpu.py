"""XLA:CPU compiler options: hand a jitted function's convolutions and matmuls to YNNPACK.

XLA:CPU can outline dots/convolutions (``dot``), elementwise chains (``eltwise``) and reductions
(``reduce``) into YNNPACK kernels (``xla_cpu_experimental_ynn_fusion_type``). Per jitted function,
through ``jax.jit(..., compiler_options=...)``, because the gain depends on the model. Measured on the
2-core development machine (AMD EPYC, AVX-512; 2026-11-28):

- 3x3 convolutions: 1.4-1.8x faster (2x256x256x32 -> 32: 23.1 -> 13.2 ms), close to PyTorch's oneDNN;
- the demo autoencoder's train step (16-32 channels at 32 px, batch 16): 90 -> 69 ms with all three;
- the demo UNet's train step (8x8 latents, batch 16): 139 -> 115 ms with ``dot``;
- but attention over long sequences with small heads gets *slower* (1024 tokens, 8 heads of 8:
  19 -> 39 ms), so the 32x32-latent benchmark UNet loses (176 -> 245 ms per forward). Off by default.

Every other backend ignores these options; :func:`compiler_options` returns ``None`` there.
"""
from __future__ import annotations

from typing import Sequence

import jax

__all__ = ["YNN_FUSION_FLAG", "YNN_FUSION_TYPES", "compiler_options", "train_compiler_options"]

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_TYPES = {"dot": "LIBRARY_FUSION_TYPE_DOT", "eltwise": "LIBRARY_FUSION_TYPE_ELTWISE",
                    "reduce": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(ynn_fusions: str | Sequence[str] | None, backend: str | None = None) -> dict | None:
    """``("dot", "eltwise")`` or ``"dot,eltwise"`` -> ``{YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_DOT,..."}``
    for ``jax.jit(compiler_options=...)``; ``None`` when nothing is asked for or the backend
    (default: JAX's default backend) is not the CPU. Unknown fusion names raise ``ValueError``."""
    if isinstance(ynn_fusions, str):
        ynn_fusions = ynn_fusions.split(",")
    names = [str(f).strip().lower() for f in (ynn_fusions or ()) if str(f).strip()]
    unknown = sorted(set(names) - set(YNN_FUSION_TYPES))
    if unknown:
        raise ValueError(f"unknown YNNPACK fusion type(s) {unknown}; expected some of {sorted(YNN_FUSION_TYPES)}")
    if not names or (backend or jax.default_backend()) != "cpu":
        return None
    ordered = [YNN_FUSION_TYPES[k] for k in YNN_FUSION_TYPES if k in names]
    return {YNN_FUSION_FLAG: ",".join(ordered)}


def train_compiler_options(train_config, backend: str | None = None) -> dict | None:
    """A trainer's XLA options for its jitted init/step, from its ``config.train`` section:
    ``ynn_fusions`` (through :func:`compiler_options`; nothing off the CPU), updated by
    ``compiler_options``, a dict such as ``{"xla_backend_optimization_level": 0}`` (CPU tests:
    several times faster compiles, slower steps). None when both are empty."""
    opts = dict(compiler_options(train_config.get("ynn_fusions"), backend) or {})
    opts.update(train_config.get("compiler_options") or {})
    return opts or None
