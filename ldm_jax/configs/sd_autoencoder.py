"""The LDM KL-f8 autoencoder recipe (SD's VAE): L1 + LPIPS + PatchGAN, KL weight 1e-6.

LDM ``autoencoder_kl_32x32x4.yaml``: base lr 4.5e-6 scaled by the global batch, disc_start 50001,
kl_weight 1e-6, disc_weight 0.5, 256 px crops. Set ``lpips.vgg_path`` to torchvision's
``vgg16-397923af.pth`` (the linear heads default to the ones shipped with the ``lpips`` package)
and point ``data`` at the images, e.g. ``--config.data.path=/data/images`` (a folder) or
``--config.data.source=tfds --config.data.name=...``; captions are not needed.
Run: ``ldm-jax train --config sd_autoencoder --workdir DIR``.
"""
import ml_collections

from ldm_jax.configs import common, sd_v1


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "sd_autoencoder"
    c.task = "autoencoder"  # ldm_jax.train.autoencoder_task
    c.vae = dict(sd_v1.get_config().vae)
    c.vae["sample_size"] = 256
    c.loss = dict(
        kind="kl",  # "vq": codebook loss of a VQModel instead of KL
        disc_start=50001,
        kl_weight=1e-6,
        codebook_weight=1.0,
        disc_weight=0.5,
        disc_factor=1.0,
        disc_loss="hinge",  # or "vanilla"
        perceptual_weight=1.0,
        pixelloss_weight=1.0,
        pixel_loss="l1",  # LDM's; "l2" weighs large errors more (short from-scratch runs keep small shapes)
        edge_weight=0.0,  # > 0: + that times pixel_loss of the finite-difference error (outlines; not LDM's)
        scale_equivariance_weight=0.0,  # > 0: + that times the loss of decode(pool2(z)) vs pool2(x) (not LDM's)
        latent_noise=0.0,  # > 0: decode z + U(0, that) * std(z) * noise (latent denoising, l-DeTok; not LDM's)
        logvar_init=0.0,
        learn_logvar=False,  # LDM's optimizer leaves logvar at 0
        disc_in_channels=3,
        disc_ndf=64,
        disc_num_layers=3,
        last_layer=("decoder", "conv_out", "kernel"),
    )
    c.optim = dict(base_learning_rate=4.5e-6, scale_lr=True, b1=0.5, b2=0.9, eps=1e-8,
                   decay_steps=0,  # 0: LDM's constant rate; N: cosine decay to 0 at update N
                   frozen=())  # autoencoder modules left as they are: ("encoder", "quant_conv") tunes the decoder
    c.train = common.loop_config(batch_size=64, accumulation=1, num_steps=500_000, checkpoint_every=5000,
                                 log_every=100, keep_every=50_000, preview_every=5000)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = ml_collections.ConfigDict(dict(min_size=2 ** 14, rules=()))
    # Images (captions unused): see ldm_jax.configs.common.data_config; image_size is the crop.
    c.data = common.data_config(source="folder", image_size=256, random_crop=True, random_flip=True, num_threads=8)
    c.lpips = dict(vgg_path="", lin_path="")
    c.init = common.init_config()
    c.distributed = ml_collections.ConfigDict(dict(enabled=False, coordinator_address="", num_processes=0,
                                                   process_id=-1))
    return c
