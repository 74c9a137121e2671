"""Weights in and out: PyTorch <-> Flax key mapping, diffusers folders, original SD checkpoints."""
from ldm_jax.convert.checkpoint_io import load_state_dict, save_state_dict
from ldm_jax.convert.diffusers_folder import LoadedModel, export_diffusers, load_pipeline_weights, load_single_file
from ldm_jax.convert.loading import convert_to_diffusers, load_model
from ldm_jax.convert.lpips import load_lpips_params
from ldm_jax.convert.original import detect_model, diffusers_to_original, infer_configs, original_to_diffusers
from ldm_jax.convert.torch_flax import (WeightsError, autoencoder_params_from_torch, clip_params_from_torch,
                                        clip_text_params_from_torch, flax_to_torch, torch_to_flax)

__all__ = [
    "LoadedModel",
    "convert_to_diffusers",
    "load_model",
    "WeightsError",
    "autoencoder_params_from_torch",
    "clip_params_from_torch",
    "clip_text_params_from_torch",
    "detect_model",
    "diffusers_to_original",
    "export_diffusers",
    "flax_to_torch",
    "infer_configs",
    "load_lpips_params",
    "load_pipeline_weights",
    "load_single_file",
    "load_state_dict",
    "original_to_diffusers",
    "save_state_dict",
    "torch_to_flax",
]
