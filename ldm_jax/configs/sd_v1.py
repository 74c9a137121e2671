"""Stable Diffusion v1 (v1-4/v1-5): CLIP ViT-L/14 text, 8-head UNet, KL-f8 autoencoder.

Field names follow the diffusers/transformers ``config.json`` of each network, so a released
model folder's configs map onto these one to one.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "sd_v1"
    c.unet = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8,  # diffusers' name; SD v1 means 8 heads per level
        cross_attention_dim=768,
        use_linear_projection=False,
        upcast_attention=False,
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    c.vae = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    c.text_encoder = dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        hidden_layer="last",  # SD v1 conditions on last_hidden_state
    )
    c.tokenizer = "openai/clip-vit-large-patch14"
    c.scheduler = dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        steps_offset=1,
    )
    c.sample = dict(height=512, width=512, num_inference_steps=50, guidance_scale=7.5, sampler="pndm")
    return c
