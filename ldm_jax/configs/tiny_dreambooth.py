"""Tiny DreamBooth run for tests and CPU experiments: a pretrained tiny model (``--config.init.pretrained=DIR``),
16 px, batch 8 (4 instance + 4 class rows), 16 generated class images."""
from ldm_jax.configs import tiny_train


def get_config():
    c = tiny_train.get_config()
    c.name = "tiny_dreambooth"
    c.stages = [dict(resolution=16, steps=40, batch_size=8)]
    c.train.update(dict(lr=1e-3, warmup_steps=0, ema_decay=0.0, text_dropout=0.0, checkpoint_every=20,
                        preview_every=0))
    c.init.unet = "pretrained"
    c.init.random_encoders = False
    c.data.source = "dreambooth"
    c.dreambooth.update(dict(num_class_images=16, sample_steps=4, guidance=3.0, sample_batch=8))
    return c
