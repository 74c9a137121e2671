"""``celebahq_text2face``'s tiny twin, for tests and the CPU: 32 px cartoon faces with CelebA-style
captions (:mod:`ldm_jax.data.faces`, written by ``ldm_jax.examples.faces_demo``), an f=4 autoencoder
(8x8x4 latents), a two-level UNet and a two-layer LDMBert trained with it.

Give the first stage with ``--config.init.vae=AUTOENCODER_WORKDIR`` (or ``init.random_encoders=True``
in tests), the faces folder with ``--config.data.path`` and a BERT tokenizer folder with
``--config.tokenizer`` (``ldm_jax.tiny_tokenizer.write_tiny_bert_tokenizer`` writes one offline).
"""
from ldm_jax.configs import celebahq_text2face


def get_config():
    c = celebahq_text2face.get_config()
    c.name = "tiny_text2face"
    c.unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                  cross_attention_dim=64, norm_num_groups=16, flip_sin_to_cos=True, freq_shift=0,
                  ignore_zero_context=True)
    # 48 positions: the stand-in's captions are at most ~45 WordPiece tokens with [CLS] and [SEP]
    c.text_encoder = dict(model_type="ldmbert", vocab_size=256, d_model=64, encoder_layers=2, encoder_ffn_dim=256,
                          encoder_attention_heads=4, head_dim=16, max_position_embeddings=48, zero_padding=True)
    c.tokenizer = None
    c.vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                 layers_per_block=1, norm_num_groups=16, sample_size=32, scaling_factor=1.0)
    c.sample = dict(height=32, width=32, num_inference_steps=15, guidance_scale=3.0, sampler="dpmpp_2m")
    c.stages = [dict(resolution=32, steps=2000, batch_size=16)]
    c.train.update(lr=1e-3, warmup_steps=100, compute_dtype="float32", remat="none", log_every=25,
                   checkpoint_every=500, keep_every=0, preview_every=0)
    c.sharding.min_size = 0
    c.data.update(random_flip=False, num_threads=2)  # hats, beards and glasses are symmetric; the flip buys nothing
    return c
