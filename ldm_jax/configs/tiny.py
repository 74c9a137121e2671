"""A tiny SD-shaped model for tests and CPU experiments (same structure as sd_v1, ~1M params)."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "tiny"
    c.unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=32,
        use_linear_projection=False,
        upcast_attention=False,
        norm_num_groups=8,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    c.vae = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.18215,
    )
    c.text_encoder = dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        hidden_layer="last",
    )
    c.tokenizer = None  # tests write a tiny tokenizer
    c.scheduler = dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        steps_offset=1,
    )
    c.sample = dict(height=64, width=64, num_inference_steps=10, guidance_scale=7.5, sampler="ddim")
    return c
