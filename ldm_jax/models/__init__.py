"""Flax modules of latent diffusion: autoencoder, UNet, CLIP text encoder, attention."""
