"""Stable Diffusion v2 (2.0/2.1, 768-v): OpenCLIP ViT-H text (penultimate layer), 64-d heads,
linear projections, attention upcast to fp32, v prediction."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "sd_v2"
    c.unet = dict(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20),  # diffusers' name for the number of heads per level
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
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
        sample_size=768,
        scaling_factor=0.18215,
    )
    c.text_encoder = dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        # SD v2 conditions on OpenCLIP's penultimate layer + final LayerNorm. The diffusers-format
        # text encoder ships only the first 23 of OpenCLIP's 24 layers, so its "last" layer is that.
        hidden_layer="last",
    )
    c.tokenizer = "stabilityai/stable-diffusion-2-1"
    c.scheduler = dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        steps_offset=1,
    )
    c.sample = dict(height=768, width=768, num_inference_steps=50, guidance_scale=9.0, sampler="ddim")
    return c
