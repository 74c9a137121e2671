"""Text-to-face on CelebA-HQ at 256 px with LDM's jointly trained BERT text encoder (the LDM paper's
text-to-image recipe on its CelebA-HQ model, conditioned on the MM-CelebA-HQ captions).

- First stage: the KL-f4 autoencoder of ``celebahq_autoencoder`` (64x64x3 latents), frozen, given by
  ``--config.init.vae=AUTOENCODER_WORKDIR`` (or any model source with a VAE). LDM scales the latents
  by 1 / their std on the first batch: ``--config.init.vae_scaling_factor=...``.
- UNet: LDM's CelebA-HQ LDM-4 (``celebahq-ldm-vq-4.yaml``: 224 channels, multipliers (1,2,3,4), 2 res
  blocks, attention at 32, 16 and 8 px with 32 channels per head), its attention levels made
  cross-attention over the caption (one transformer block each, as LDM's text-to-image UNet).
- Text encoder: LDM's ``BERTEmbedder`` (:class:`~ldm_jax.models.ldm_bert.LDMBertModel`, BERT's
  uncased WordPiece tokens), trained from scratch with the UNet (``train.train_text_encoder``),
  at half the width and depth of LDM's LAION model (640 x 16 instead of 1280 x 32): the captions
  are short sentences from a small vocabulary. 10% of the captions are dropped for
  classifier-free guidance. Unlike LDM, the UNet's cross-attention leaves the padding out
  (``text_encoder.zero_padding`` + ``unet.ignore_zero_context``): on the faces stand-in the prompt is
  followed after 1000 steps instead of not at all, and small attributes far better (docs/text2face.md).
- Schedule: LDM's ``linear`` betas 0.0015 -> 0.0195 (``scaled_linear`` in diffusers' naming), eps.
- Data: MM-CelebA-HQ in its folder layout, ``--config.data.path=ROOT`` with ``ROOT/images/<id>.jpg``
  and ``ROOT/text/<id>.txt`` (ten caption lines per image; one is drawn each time the image comes
  up). The release's own names: ``--config.data.path=ROOT/CelebA-HQ-img
  --config.data.captions_dir=ROOT/celeba-caption``.
Run: ``ldm-jax train --config celebahq_text2face --workdir DIR --config.init.vae=AE_WORKDIR
--config.data.path=ROOT``; ``ldm-jax sample --model DIR "The woman has blond hair. She is smiling."``.
A tiny twin for tests and the CPU: ``tiny_text2face``.
"""
from ldm_jax.configs import sd_v1_train


def get_config():
    c = sd_v1_train.get_config()
    c.name = "celebahq_text2face"
    c.unet = dict(
        sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(224, 448, 672, 896),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(7, 14, 21, 28),  # heads per level: 32 channels each, as LDM's num_head_channels
        cross_attention_dim=640, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
        ignore_zero_context=True,  # with text_encoder.zero_padding: the padding is left out of cross-attention
    )
    c.text_encoder = dict(model_type="ldmbert", vocab_size=30522, d_model=640, encoder_layers=16,
                          encoder_ffn_dim=2560, encoder_attention_heads=8, head_dim=64, max_position_embeddings=77,
                          zero_padding=True)
    c.tokenizer = "bert-base-uncased"  # LDM's BERTTokenizer; any BERT tokenizer folder works
    c.vae = dict(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(128, 256, 512),
                 layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=1.0)  # init.vae's replaces it
    c.scheduler = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                       prediction_type="epsilon", steps_offset=1)
    c.sample = dict(height=256, width=256, num_inference_steps=50, guidance_scale=3.0, sampler="ddim")
    # LDM's CelebA-HQ LDM-4: batch 48, lr 2e-6 x batch (9.6e-5), ~410k steps
    c.stages = [dict(resolution=256, steps=410_000, batch_size=48)]
    c.train.update(lr=9.6e-5, warmup_steps=10_000, train_text_encoder=True, text_dropout=0.1)
    c.data.update(source="folder", random_flip=True, num_threads=8)
    return c
