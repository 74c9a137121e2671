"""A tiny KL (or ``:vq``) autoencoder run for tests and CPU experiments: ``tiny``'s VAE on 16 px
shapes_captions (``ldm-jax train --config tiny_autoencoder --workdir DIR``)."""
from ldm_jax.configs import sd_autoencoder, tiny


def get_config(arg=None):
    """``tiny_autoencoder:vq``: the VQ variant (``VQModel``, codebook loss)."""
    c = sd_autoencoder.get_config()
    c.name = "tiny_autoencoder"
    c.vae = dict(tiny.get_config().vae)
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
    c.train.update(dict(batch_size=8, num_steps=200, log_every=20, checkpoint_every=100, keep_every=0,
                        preview_every=100))
    # shapes_captions at 16 px, built on first use under workdir/data
    c.data.update(dict(source="shapes", image_size=16, num_train=512, num_validation=16, num_heldout=16,
                       random_crop=False, random_flip=True, num_threads=2, num_examples=64))
    return c
