"""The LDM KL-f8 autoencoder recipe (SD's VAE): L1 + LPIPS + PatchGAN, KL weight 1e-6.

LDM ``autoencoder_kl_32x32x4.yaml``: base lr 4.5e-6 scaled by the global batch, disc_start 50001,
kl_weight 1e-6, disc_weight 0.5, 256 px crops. Set ``lpips.vgg_path`` to torchvision's
``vgg16-397923af.pth`` (the linear heads default to the ones shipped with the ``lpips`` package).
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
    c = ml_collections.ConfigDict()
    c.name = "sd_autoencoder"
    c.vae = dict(_sibling("sd_v1").get_config().vae)
    c.vae["sample_size"] = 256
    c.loss = dict(
        kind="kl",  # "vq": codebook loss of a VQModel instead of KL
        disc_start=50001,
        kl_weight=1e-6,
        codebook_weight=1.0,
        disc_weight=0.5,
        disc_factor=1.0,
        disc_loss="hinge",
        perceptual_weight=1.0,
        pixelloss_weight=1.0,
        logvar_init=0.0,
        learn_logvar=False,  # LDM's optimizer leaves logvar at 0
        disc_in_channels=3,
        disc_ndf=64,
        disc_num_layers=3,
        last_layer=("decoder", "conv_out", "kernel"),
    )
    c.optim = dict(base_learning_rate=4.5e-6, scale_lr=True, b1=0.5, b2=0.9, eps=1e-8)
    c.train = dict(batch_size=64, accumulation=1, num_steps=500_000, seed=0, log_every=100,
                   checkpoint_every=5000, keep_checkpoints=3, progress=True)
    c.data = dict(source="synthetic", image_size=256, num_images=256, seed=0)
    c.lpips = dict(vgg_path="", lin_path="")
    return c
