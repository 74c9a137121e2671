"""A tiny random transformers ``CLIPModel`` (+ the tiny tokenizer) for the CLIP score tests."""
import os

import torch
import transformers

from ldm_jax.reference import randomise_
from tiny_tokenizer import VOCAB_SIZE, write_tiny_clip_tokenizer

IMAGE_SIZE = 32


def tiny_clip_model(seed: int = 0) -> "transformers.CLIPModel":
    """CLIP with every weight random (``randomise_``: norm scales 1 + noise), eval mode.

    Text: legacy ``eos_token_id=2`` as openai/clip-vit-*; vision: 32 px, 8 px patches, gelu.
    """
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8, hidden_act="gelu"),
        projection_dim=16)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config)
    randomise_(model, seed, scale=0.2)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)  # exp(2.3) ~ 10: logits of a useful size
    return model.eval()


def write_tiny_clip_folder(path, seed: int = 0):
    """``save_pretrained`` folder (config.json, model.safetensors) + tokenizer files -> (path, torch model)."""
    model = tiny_clip_model(seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_tiny_clip_tokenizer(path)
    return os.fspath(path), model
