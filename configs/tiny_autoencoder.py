"""A tiny KL autoencoder run for tests and CPU demos (configs/tiny.py's VAE, 16 px synthetic images)."""


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
    c = _sibling("sd_autoencoder").get_config()
    c.name = "tiny_autoencoder"
    c.vae = dict(_sibling("tiny").get_config().vae)
    c.loss.disc_start = 100
    c.loss.disc_ndf = 8
    c.loss.disc_num_layers = 2
    c.optim.base_learning_rate = 1e-3
    c.optim.scale_lr = False
    c.train.batch_size = 8
    c.train.num_steps = 200
    c.train.log_every = 20
    c.train.checkpoint_every = 100
    c.data.image_size = 16
    c.data.num_images = 64
    return c
