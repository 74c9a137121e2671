"""Tiny LoRA fine-tuning run for tests and CPU experiments: ``tiny_train`` with rank-4 adapters on a
pretrained tiny UNet (``--config.init.pretrained=DIR``, e.g. ``ldm_jax.reference.write_reference_folder``
or a ``tiny_train`` workdir)."""
from ldm_jax.configs import tiny_train


def get_config():
    c = tiny_train.get_config()
    c.name = "tiny_lora"
    c.stages = [dict(resolution=16, steps=50, batch_size=8)]
    c.train.update(dict(trainable="lora", lr=1e-2, warmup_steps=5, ema_decay=0.9, checkpoint_every=25,
                        preview_every=0))
    c.lora.update(dict(rank=4, alpha=4.0))
    c.init.unet = "pretrained"
    c.init.random_encoders = False
    return c
