"""Small random Stable-Diffusion-shaped reference models in diffusers/transformers (PyTorch).

Used by the parity tests and by ``ldm-jax bench`` (which compares against diffusers' PyTorch
pipeline on the same weights). Needs the ``test`` extra (torch, diffusers); nothing in the
library's runtime path imports this module.
"""
from __future__ import annotations

import os

from ldm_jax.tiny_tokenizer import VOCAB_SIZE, write_tiny_clip_tokenizer, write_tiny_gpt2_tokenizer

# name -> (unet kwargs, vae kwargs, text kwargs); all diffusers/transformers config names.
VARIANTS = {
    # SD v1 shape: int heads, conv projections, quick_gelu CLIP, last layer.
    "v1": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  norm_num_groups=8, sample_size=8),
        vae=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 sample_size=16),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu"),
    ),
    # SD v2 shape: per-level heads, linear projections, attention upcast, gelu CLIP.
    "v2": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                  use_linear_projection=True, upcast_attention=True, norm_num_groups=8, sample_size=8),
        vae=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 sample_size=16),
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="gelu"),
    ),
    # A bigger SD-v1-shaped model for CPU benchmarks (~2.5M UNet params, 32x32 latents).
    "small": dict(
        unet=dict(block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                  norm_num_groups=16, sample_size=32),
        vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 sample_size=256),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu"),
    ),
}


def randomise_(module, seed: int = 0, scale: float = 0.1):
    """Overwrite every parameter with N(0, scale^2) noise (norm scales: 1 + noise) and set eval mode.

    diffusers zero-initialises some output projections; random values exercise every path.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm_scale else noise)
    return module.eval()


def build_reference_pipeline(variant: str = "v1", *, seed: int = 0, inpainting: bool = False,
                             tokenizer_dir: str | None = None, scheduler_config: dict | None = None):
    """A random diffusers ``StableDiffusionPipeline`` (or inpainting pipeline) of ``VARIANTS[variant]``."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown reference variant {variant!r}; expected one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    torch.manual_seed(seed)
    unet_kw = dict(spec["unet"], in_channels=9 if inpainting else 4, out_channels=4)
    unet = randomise_(UNet2DConditionModel(**unet_kw), seed)
    vae = randomise_(AutoencoderKL(**spec["vae"]), seed + 1, scale=0.05)
    pad = "!" if variant == "v2" else "<|endoftext|>"
    tok_dir = write_tiny_clip_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="tiny_tok_"), pad_token=pad)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_cfg = CLIPTextConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=77,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **spec["text"])
    text_encoder = randomise_(CLIPTextModel(text_cfg), seed + 2)
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)
    sched.update(scheduler_config or {})
    scheduler = DDIMScheduler(**sched)
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    return cls(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_reference_folder(path: str, variant: str = "v1", *, seed: int = 0, inpainting: bool = False,
                           scheduler_config: dict | None = None) -> str:
    """Write a random diffusers model folder (``save_pretrained``) and return its path."""
    pipe = build_reference_pipeline(variant, seed=seed, inpainting=inpainting, scheduler_config=scheduler_config)
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return os.fspath(path)


def write_reference_gpt2(path: str, *, seed: int = 0, n_embd: int = 32, n_layer: int = 2, n_head: int = 4,
                         n_positions: int = 64, scale: float = 0.3, safe_serialization: bool = True) -> str:
    """Write a random transformers ``GPT2LMHeadModel`` with the tiny GPT-2 tokenizer into ``path``
    (``save_pretrained``: ``model.safetensors``, or ``pytorch_model.bin`` without ``safe_serialization``)
    and return it. ``scale``: the weights' spread; large enough that the next token's logits are
    far apart, so greedy decoding does not hang on float rounding."""
    import json

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = os.fspath(path)
    write_tiny_gpt2_tokenizer(path, model_max_length=n_positions)
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    eos = vocab["<|endoftext|>"]
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, bos_token_id=eos, eos_token_id=eos)
    model = randomise_(GPT2LMHeadModel(cfg), seed, scale=scale)
    with torch.no_grad():  # LayerNorm scales near 1 (randomise_ knows them by "norm" in the name)
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.add_(1.0)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    return path
