"""Tiny diffusion training run for tests and CPU experiments (``tiny``'s models, 8x8 latents)."""
from ldm_jax.configs import sd_v1_train, tiny


def get_config():
    c = sd_v1_train.get_config()
    small = tiny.get_config()
    for k in ("unet", "vae", "text_encoder", "scheduler", "sample"):
        c[k] = small[k]
    c.tokenizer = None
    c.name = "tiny_train"
    # 16 px images -> 8x8 latents (the tiny VAE downsamples by 2).
    c.stages = [dict(resolution=16, steps=200, batch_size=16)]
    c.train.update(dict(lr=1e-3, warmup_steps=10, ema_decay=0.999, compute_dtype="float32", remat="none",
                        log_every=10, checkpoint_every=100, keep_every=0, preview_every=100, preview_count=4,
                        preview_steps=10))
    c.sharding.min_size = 0  # shard every divisible param, so tiny models exercise FSDP
    # --config.data.cached_latents=DIR: train on `ldm-jax encode-dataset --image-size 16 --out DIR` output
    # (VAE moments + text context; the frozen encoders are skipped) instead of data.source.
    c.data.update(dict(source="synthetic", num_examples=64, num_classes=4))
    # tests train against random encoders unless they pass --config.init.pretrained=DIR (a tiny diffusers folder)
    c.init.random_encoders = True
    return c
