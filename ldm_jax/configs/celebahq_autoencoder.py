"""The first stage of the CelebA-HQ text-to-face recipe: LDM's KL-f4 autoencoder (256 px -> 64x64x3).

LDM ``models/first_stage_models/kl-f4/config.yaml``: ``ch=128, ch_mult=(1,2,4), num_res_blocks=2,
z_channels=embed_dim=3``, no attention in the resolutions, L1 + LPIPS + PatchGAN from step 50001,
KL weight 1e-6, base lr 4.5e-6 scaled by the global batch. Data: the CelebA-HQ images (captions are
not read), e.g. ``--config.data.path=/data/mm-celeba-hq`` (``images/``). Then train the diffusion
stage on its latents: ``ldm-jax train --config celebahq_text2face --config.init.vae=THIS_WORKDIR``.
Run: ``ldm-jax train --config celebahq_autoencoder --workdir DIR``.
"""
from ldm_jax.configs import sd_autoencoder


def get_config():
    c = sd_autoencoder.get_config()
    c.name = "celebahq_autoencoder"
    c.vae = dict(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(128, 256, 512),
                 layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=1.0)
    c.train.update(batch_size=64, num_steps=200_000)
    c.data.update(source="folder", image_size=256, random_crop=False, random_flip=True)  # CelebA-HQ is aligned
    return c
