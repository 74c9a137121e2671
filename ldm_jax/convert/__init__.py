"""Weights in and out: PyTorch <-> Flax key mapping, diffusers folders, original SD checkpoints."""
from ldm_jax.convert.torch_flax import WeightsError, flax_to_torch, torch_to_flax

__all__ = ["WeightsError", "flax_to_torch", "torch_to_flax"]
