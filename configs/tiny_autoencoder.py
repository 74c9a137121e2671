"""A tiny KL (or ``:vq``) autoencoder run for tests and CPU demos: configs/tiny.py's VAE on 16 px
shapes_captions (``ldm-jax train-autoencoder --config configs/tiny_autoencoder.py --workdir DIR``)."""


def _sibling(name):
    """Load configs/<name>.py by path (config files are loaded by path, not as a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location(f"_ldm_jax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    """``configs/tiny_autoencoder.py:vq``: the VQ variant (``VQModel``, codebook loss)."""
    c = _sibling("sd_autoencoder").get_config()
    c.name = "tiny_autoencoder"
    c.vae = dict(_sibling("tiny").get_config().vae)
    if arg == "vq":
        c.name = "tiny_autoencoder_vq"
        c.loss.kind = "vq"
        c.vae.update(num_vq_embeddings=64, vq_embed_dim=4)
    elif arg is not None:
        raise ValueError(f"tiny_autoencoder: unknown variant {arg!r} (expected 'vq')")
    c.loss.disc_start = 100
    c.loss.disc_ndf = 8
    c.loss.disc_num_layers = 2
    c.optim.base_learning_rate = 1e-3
    c.optim.scale_lr = False
    c.train.batch_size = 8
    c.train.num_steps = 200
    c.train.log_every = 20
    c.train.checkpoint_every = 100
    c.train.keep_every = 0
    c.train.image_every = 100
    # shapes_captions at 16 px, built on first use under workdir/data
    c.data.update(dict(source="shapes", image_size=16, num_train=512, num_validation=16, num_heldout=16,
                       random_crop=False, random_flip=True, num_threads=2, num_images=64))
    return c
