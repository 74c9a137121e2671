"""The SD v1 diffusion training recipe: 256 px then 512 px, 10% text dropout, batch 2048,
AdamW lr 1e-4 after a 10k-step linear warm-up, EMA 0.9999 (LDM warm-up formula).

Stage lengths follow v1-1 (237k steps at 256 px, then 194k at 512 px); later checkpoints
(v1-2..v1-5) continue at 512 px. ``--config.mesh.fsdp=N`` shards params/optimizer over N devices.
"""
import ml_collections


def _sibling(name):
    """Load configs/<name>.py by path (config files are loaded by path, not as a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location(f"_ldm_jax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _sibling("sd_v1").get_config()
    c.name = "sd_v1_train"
    c.stages = [
        dict(resolution=256, steps=237_000, batch_size=2048),
        dict(resolution=512, steps=194_000, batch_size=2048),
    ]
    c.train = ml_collections.ConfigDict(dict(
        seed=0,
        lr=1e-4,
        warmup_steps=10_000,
        decay_steps=0,  # 0: constant after warm-up (SD); N: cosine decay to 0 at update N
        b1=0.9,
        b2=0.999,
        adam_eps=1e-8,
        weight_decay=1e-2,
        grad_clip_norm=1.0,
        ema_decay=0.9999,
        ema_warmup=True,  # min(decay, (1 + n) / (10 + n))
        text_dropout=0.1,
        prediction_type="epsilon",
        min_snr_gamma=0.0,  # 0: off; 5.0 is the min-SNR paper's choice
        compute_dtype="bfloat16",  # fp32 master weights, bf16 compute
        # XLA:CPU only (ignored elsewhere): matmuls and softmax reductions to YNNPACK, convolutions to
        # XLA's own kernel. configs/tiny_train.py's step on the 2-core machine: 202 -> 183 ms ("dot"
        # alone: 284 ms). "" for XLA's defaults.
        ynn_fusions="dot,reduce",
        remat=True,
        grad_accum_steps=1,
        log_every=50,
        checkpoint_every=2_000,
        keep_checkpoints=3,
        keep_every=50_000,
        async_checkpoints=True,
        tensorboard=True,
        sample_every=5_000,  # EMA sample grid to TensorBoard (0: off)
        sample_count=8,
        sample_steps=20,
        sample_guidance=5.0,
        progress=True,
        compilation_cache_dir=None,  # a path: persistent XLA cache, restarts skip recompiling
        empty_prompt_ids=None,  # None: tokenize "" with config.tokenizer
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = ml_collections.ConfigDict(dict(min_size=2 ** 14, rules=()))
    # cached_latents: a directory of `ldm-jax encode-dataset` output (used instead of source)
    c.data = ml_collections.ConfigDict(dict(source="synthetic", seed=0, cached_latents=""))
    c.distributed = ml_collections.ConfigDict(dict(enabled=False))
    return c
