"""The LDM KL-f8 autoencoder recipe (SD's VAE): L1 + LPIPS + PatchGAN, KL weight 1e-6.

LDM ``autoencoder_kl_32x32x4.yaml``: base lr 4.5e-6 scaled by the global batch, disc_start 50001,
kl_weight 1e-6, disc_weight 0.5, 256 px crops. Set ``lpips.vgg_path`` to torchvision's
``vgg16-397923af.pth`` (the linear heads default to the ones shipped with the ``lpips`` package)
and point ``data`` at the images, e.g. ``--config.data.path=/data/images`` (a folder) or
``--config.data.source=tfds --config.data.name=...``; captions are not needed.
Run: ``ldm-jax train-autoencoder --config configs/sd_autoencoder.py --workdir DIR``.
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
    c.optim = dict(base_learning_rate=4.5e-6, scale_lr=True, b1=0.5, b2=0.9, eps=1e-8,
                   decay_steps=0)  # 0: LDM's constant rate; N: cosine decay to 0 at update N
    c.train = dict(batch_size=64, accumulation=1, num_steps=500_000, seed=0, log_every=100,
                   checkpoint_every=5000, keep_checkpoints=3, keep_every=50_000, async_checkpoints=True,
                   progress=True, tensorboard=True, image_every=5000, image_count=8,
                   compiler_options=None)  # XLA options of the jitted init/step (dict), e.g. for CPU tests
    c.mesh = dict(data=-1)
    # Images (captions unused). source: "folder" (path, captions_file), "tar" (shards), "tfds" (name,
    # split, data_dir, image_key), "shapes" (built-in shapes_captions under data_dir, default
    # workdir/data: num_train/num_validation/num_heldout, dataset_seed, max_shapes, shape_scale) or
    # "synthetic" (num_images).
    # seed: shuffling and augmentation; image_size: shorter side resized, then a square crop.
    c.data = dict(source="folder", path="", captions_file="", shards="", name="", split="train", data_dir="",
                  image_key="", image_size=256, random_crop=True, random_flip=True, seed=0, num_threads=8,
                  num_train=2000, num_validation=200, num_heldout=200, dataset_seed=0, max_shapes=2,
                  shape_scale=1.0, num_images=256)
    c.lpips = dict(vgg_path="", lin_path="")
    return c
