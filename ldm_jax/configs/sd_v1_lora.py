"""LoRA fine-tuning of released SD v1 weights on your images (diffusers' ``train_text_to_image_lora``
settings): rank-4 adapters on the UNet's attention projections, the rest frozen; 512 px, batch 32,
AdamW lr 1e-4, 5k steps.

Run: ``ldm-jax train --config sd_v1_lora --workdir DIR --config.init.pretrained=MODEL
--config.data.source=folder:IMAGES`` (captions beside the images, as for ``sd_v1_train``), then
``ldm-jax sample --model DIR ...`` (the adapters merged) or ``ldm-jax convert DIR OUT --adapter`` (a
``pytorch_lora_weights.safetensors`` for diffusers, ``ldm-jax sample --lora``).
``--config.lora.text_targets='self_attn/(q_proj|k_proj|v_proj|out_proj)$'`` adapts CLIP too.
"""
from ldm_jax.configs import sd_v1_train


def get_config():
    c = sd_v1_train.get_config()
    c.name = "sd_v1_lora"
    c.stages = [dict(resolution=512, steps=5_000, batch_size=32)]
    c.train.update(dict(trainable="lora", lr=1e-4, warmup_steps=100, weight_decay=1e-2, ema_decay=0.999,
                        checkpoint_every=500, keep_every=0, preview_every=500))
    c.lora.update(dict(rank=4, alpha=4.0, base_dtype="bfloat16"))
    c.init.unet = "pretrained"  # the UNet the adapters adapt
    c.data.source = "folder"
    return c
