"""Tiny textual-inversion run for tests and CPU experiments: ``tiny_train``'s settings, a pretrained tiny
model (``--config.init.pretrained=DIR``) and the placeholder ``<concept>``."""
from ldm_jax.configs import tiny_train


def get_config():
    c = tiny_train.get_config()
    c.name = "tiny_textual_inversion"
    c.stages = [dict(resolution=16, steps=50, batch_size=8)]
    c.train.update(dict(trainable="textual_inversion", lr=1e-2, warmup_steps=5, weight_decay=0.0, ema_decay=0.9,
                        text_dropout=0.0, checkpoint_every=25, preview_every=0))
    c.init.unet = "pretrained"
    c.init.random_encoders = False
    return c
