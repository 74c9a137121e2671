"""ldm_jax: latent diffusion (Stable Diffusion) in JAX/Flax.

``from ldm_jax import StableDiffusionPipeline`` (imported lazily so ``import ldm_jax`` stays light).
"""
__version__ = "0.1.0"

_LAZY = {
    "StableDiffusionPipeline": ("ldm_jax.pipeline", "StableDiffusionPipeline"),
    "load_model": ("ldm_jax.convert.loading", "load_model"),
    "load_config": ("ldm_jax.config_utils", "load_config"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ldm_jax' has no attribute {name!r}")


__all__ = sorted(_LAZY)
