"""Tiny diffusion training run for tests and CPU demos (configs/tiny.py's models, 8x8 latents)."""


def _sibling(name):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location(f"_ldm_jax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _sibling("sd_v1_train").get_config()
    tiny = _sibling("tiny").get_config()
    for k in ("unet", "vae", "text_encoder", "scheduler", "sample"):
        c[k] = tiny[k]
    c.tokenizer = None
    c.name = "tiny_train"
    # 16 px images -> 8x8 latents (the tiny VAE downsamples by 2).
    c.stages = [dict(resolution=16, steps=200, batch_size=16)]
    c.train.update(dict(lr=1e-3, warmup_steps=10, ema_decay=0.999, compute_dtype="float32", remat=False,
                        log_every=10, checkpoint_every=100, keep_every=0, tensorboard=True,
                        sample_every=100, sample_count=4, sample_steps=10))
    c.sharding.min_size = 0  # shard every divisible param, so tiny models exercise FSDP
    # --config.data.cached_latents=DIR: train on `ldm-jax encode-dataset --image-size 16 --out DIR` output
    # (VAE moments + text context; the frozen encoders are skipped) instead of data.source.
    c.data.update(dict(source="synthetic", num_examples=64, num_classes=4, cached_latents=""))
    return c
