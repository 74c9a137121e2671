"""The end-to-end CPU demo (``make demo``): shapes_captions -> tiny autoencoder -> tiny text-conditioned
latent diffusion -> samples per guidance scale -> report. Sized for a 2-core machine; the
measurements behind each setting are in ``docs/demo.md``."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.time_budget_s = 1200  # the whole run on the 2-core CPU machine; metrics.json records whether it fit
    # The reference machine's autoencoder rate and the time of everything after that stage (a 2-core Intel
    # Xeon with AMX, docs/demo.md; a 2-core AMD EPYC is ~1.7x slower); after the autoencoder, the demo
    # projects its total from them and says at once when the run will overshoot the budget.
    c.time_reference = dict(autoencoder_steps_per_s=16.3, after_autoencoder_s=765.0)
    # One shape per scene: the evaluation reads one shape's attributes. Shapes drawn 1.15x the default
    # size: at 32 px a small default shape is ~5 px across, which the f=4 autoencoder (one latent per
    # 4x4 pixels) blurs into a blob of the wrong shape.
    c.data = dict(image_size=32, num_train=4000, num_validation=200, num_heldout=200, seed=0, max_shapes=1,
                  shape_scale=1.15)
    # L2 pixel loss: with L1 a short run reconstructs the flat background and drops small shapes. With
    # the pixel loss alone the decoder draws blobs for thousands of steps (shape round trip 0.86 after
    # 6000); the edge term (error of the finite differences, weight 2) weighs the outlines directly:
    # 0.92-0.96 after 4000 steps (docs/demo.md).
    # lr_decay: "constant" (LDM) or "cosine" (anneals to 0 over the stage's steps); a cosine decay over
    # 6000 steps stopped the shapes from forming (round trip 0.55).
    # kl_weight: LDM's 1e-6. 1e-2 made the shape a larger part of seed 2's latents (demo.latent_shape_split:
    # shape 0.20 -> 0.39, its run then reached the shape figures) but not seed 1's (0.16 -> 0.21, no gain).
    # scale_equivariance_weight (Skorokhodov et al. 2025): 1.0 on seed 2 read shape 0.14, no better.
    # latent_noise 0.3 (decode noisy latents, l-DeTok): latents the diffusion model learns shapes in; without
    # it, at 3000 diffusion steps, seeds 1 and 2 fail on shape (held-out 0.707 / 0.747); 0.7 and 1.0 lose the
    # shape. The noise costs the decoder sharpness on clean latents (seed 2's shape round trip 0.83), so
    # decoder_steps fine-tunes the decoder on clean latents, encoder frozen (the latents, hence the diffusion
    # stage, are unchanged): seed 2's round trip shape 0.83 -> 0.88 (500 steps) / 0.905 (1000), generated
    # shape +0.03-0.07; 500 steps read within 0.02 of 1000 on seeds 0 and 2 in ~35 s less (docs/demo.md).
    # ynn_fusions: the op kinds XLA:CPU hands to YNNPACK in this stage's step (ldm_jax.runtime.ynn_options).
    c.autoencoder = dict(steps=4000, batch_size=16, lr=1e-3, pixel_loss="l2", edge_weight=2.0, kl_weight=1e-6,
                         scale_equivariance_weight=0.0, latent_noise=0.3, decoder_steps=500, b1=0.5, b2=0.9,
                         lr_decay="constant", warmup_steps=0, ynn_fusions=("dot", "eltwise", "reduce"))
    # The frozen text encoder is first trained to read the training captions' attributes: the stand-in
    # for CLIP pretraining, since a frozen *random* encoder cannot bind colours to objects. 1600 steps:
    # with 800 the held-out colour probe fell to 0.84 on one seed of three.
    c.text_pretrain = dict(steps=1600, batch_size=64, lr=1e-3)
    # Min-SNR weighting with gamma 1 (low-noise steps weigh less than with gamma 5: seed 2's held-out shape
    # 0.656 -> 0.727, docs/demo.md) and a cosine decay; cached latents (the training split encoded once by
    # the frozen encoders) so that a step runs the UNet only and more steps fit the budget. 5000 steps:
    # +0.02-0.05 on every figure of seed 2's run at 4000 -> 5000; 6000 gave nothing more.
    c.diffusion = dict(steps=5000, batch_size=16, lr=3e-3, warmup_steps=100, text_dropout=0.1, lr_decay="cosine",
                       min_snr_gamma=1.0, ynn_fusions=(), cached_latents=True)
    # Guidance 1 and 3: the bar's pair (7.5 was never the best guidance of a demo model, docs/demo.md),
    # so the evaluation samples 2 x 2 x 256 images, not 3 x 2 x 256. DPM-Solver++(2M) in 15 steps reads what
    # DDIM in 25 did (one model, 256 prompts: seen 0.964 / 0.964, held-out 0.849 / 0.858) with 40% fewer
    # UNet evaluations.
    c.sample = dict(steps=15, sampler="dpmpp_2m", guidance_scales=(1.0, 3.0), num_prompts=8)
    # Attribute classifier trained on real images reads generated ones; the bar of `make demo`.
    # 256 prompts per split and guidance: a standard error of ~0.015-0.03 on each figure. The bar, at the
    # best guidance >= 3: the mean attribute accuracy and the worst attribute's (shape, in practice) on
    # seen prompts and on held-out (shape, colour) pairs, and the mean above guidance 1's.
    c.eval = dict(num_prompts=256, batch_size=128, classifier_images=4000, classifier_steps=1800,
                  classifier_batch_size=64, ynn_fusions=("dot", "eltwise", "reduce"),
                  targets=dict(seen_mean=0.92, seen_worst=0.8, heldout_mean=0.78, heldout_worst=0.65))
    c.word_vocab = True  # one token per caption word (see caption_words)
    c.auto_scaling_factor = True  # SD's 1/std of the latents, measured after the autoencoder stage
    c.unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                  layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                  cross_attention_dim=64, norm_num_groups=16, flip_sin_to_cos=True, freq_shift=0)
    c.vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                 layers_per_block=1, norm_num_groups=16, sample_size=32, scaling_factor=1.0)
    # 32 tokens, not CLIP's 77: the demo's captions are at most 22 (BOS and EOS included), and every
    # position costs in the text pretraining (attention over the sequence), the cached context and the
    # UNet's cross-attention. The tokenizer pads and truncates to the same length.
    c.text_encoder = dict(vocab_size=864, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=32, hidden_act="quick_gelu",
                          bos_token_id=862, eos_token_id=863, pad_token_id=863, hidden_layer="last")
    c.scheduler = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012, prediction_type="epsilon", steps_offset=1)
    return c
