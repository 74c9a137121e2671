"""Textual inversion on released SD v1 weights (diffusers' ``textual_inversion.py`` settings): one new
word's embedding learns from a few images whose captions contain it; UNet, VAE and text encoder frozen.
512 px, batch 16, AdamW lr 5e-3 (no weight decay), 3k steps.

Run: ``ldm-jax train --config sd_v1_textual_inversion --workdir DIR --config.init.pretrained=MODEL
--config.data.source=folder:IMAGES --config.textual_inversion.placeholder_token='<my-cat>'
--config.textual_inversion.initializer_token=cat`` (captions such as "a photo of <my-cat>"), then
``ldm-jax sample --model DIR --prompt "<my-cat> on the beach"`` or ``ldm-jax convert DIR OUT --adapter``
(``learned_embeds.safetensors`` for diffusers' ``load_textual_inversion``).
"""
from ldm_jax.configs import sd_v1_train


def get_config():
    c = sd_v1_train.get_config()
    c.name = "sd_v1_textual_inversion"
    c.stages = [dict(resolution=512, steps=3_000, batch_size=16)]
    c.train.update(dict(trainable="textual_inversion", lr=5e-3, warmup_steps=0, weight_decay=0.0, ema_decay=0.99,
                        text_dropout=0.0, checkpoint_every=500, keep_every=0, preview_every=500))
    c.init.unet = "pretrained"
    c.data.source = "folder"
    return c
