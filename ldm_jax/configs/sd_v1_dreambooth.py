"""DreamBooth on released SD v1 weights (diffusers' ``train_dreambooth.py`` settings): the whole UNet
fine-tuned on a few images of one subject with prior preservation (100 class images generated first,
prior loss weight 1); 512 px, batch 8 (4 instance + 4 class), AdamW lr 5e-6, 800 steps, no EMA.

Run: ``ldm-jax train --config sd_v1_dreambooth --workdir DIR --config.init.pretrained=MODEL
--config.data.path=INSTANCE_IMAGES --config.dreambooth.instance_prompt='a photo of sks dog'
--config.dreambooth.class_prompt='a photo of dog'``; ``--config.train.trainable=lora`` trains LoRA
adapters instead (``config.lora``; lr 1e-4 then).
"""
from ldm_jax.configs import sd_v1_train


def get_config():
    c = sd_v1_train.get_config()
    c.name = "sd_v1_dreambooth"
    c.stages = [dict(resolution=512, steps=800, batch_size=8)]
    c.train.update(dict(lr=5e-6, warmup_steps=0, weight_decay=1e-2, ema_decay=0.0, text_dropout=0.0,
                        checkpoint_every=200, keep_every=0, preview_every=200))
    c.init.unet = "pretrained"
    c.data.source = "dreambooth"
    return c
