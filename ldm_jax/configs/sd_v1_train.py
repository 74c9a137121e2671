"""The SD v1 diffusion training recipe: 256 px then 512 px, 10% text dropout, batch 2048,
AdamW lr 1e-4 after a 10k-step linear warm-up, EMA 0.9999 (LDM warm-up formula).

Stage lengths follow v1-1 (237k steps at 256 px, then 194k at 512 px); later checkpoints
(v1-2..v1-5) continue at 512 px. ``--config.mesh.fsdp=N`` shards params/optimizer over N devices.
Run: ``ldm-jax train --config sd_v1_train --workdir DIR``.
"""
import ml_collections

from ldm_jax.configs import common, sd_v1


def get_config():
    c = sd_v1.get_config()
    c.name = "sd_v1_train"
    c.task = "diffusion"  # ldm_jax.train.diffusion_task
    c.stages = [
        dict(resolution=256, steps=237_000, batch_size=2048),
        dict(resolution=512, steps=194_000, batch_size=2048),
    ]
    c.train = common.loop_config(
        lr=1e-4,
        warmup_steps=10_000,
        decay_steps=0,  # 0: constant after warm-up (SD); N: cosine decay to 0 at update N
        b1=0.9,
        b2=0.999,
        adam_eps=1e-8,
        mu_dtype="",  # "bfloat16": AdamW's first moment in bf16 (memory); "": the params' float32
        weight_decay=1e-2,
        grad_clip_norm=1.0,
        ema_decay=0.9999,
        ema_warmup=True,  # min(decay, (1 + n) / (10 + n))
        text_dropout=0.1,
        prediction_type="",  # "": the scheduler's; "epsilon" or "v_prediction" to override it
        min_snr_gamma=0.0,  # 0: off; 5.0 is the min-SNR paper's choice
        compute_dtype="bfloat16",  # fp32 master weights, bf16 compute
        remat="full",  # activation memory: none | full | dots | offload (ldm_jax.models.remat)
        grad_accum_steps=1,
        checkpoint_every=2_000,
        keep_every=50_000,
        preview_every=5_000,  # EMA sample grid to TensorBoard
        preview_steps=20,  # DDIM steps of the preview samples
        preview_guidance=5.0,
        empty_prompt_ids=ml_collections.config_dict.placeholder(list),  # None: tokenize "" with config.tokenizer
        # "unet": every UNet weight | "lora": adapters only (config.lora) | "textual_inversion": the
        # placeholder's embeddings only (config.textual_inversion); the rest frozen
        trainable="unet",
        # with trainable="unet": the text encoder trains with the UNet (its params, EMA and AdamW state
        # beside the UNet's; LDM's jointly trained BERT, or fine-tuning CLIP as diffusers' --train_text_encoder)
        train_text_encoder=False,
        # the trained text encoder's learning rate (and weight decay) relative to train.lr: an encoder
        # learning from nothing beside the UNet (LDM's BERT) is slow to start
        text_encoder_lr_scale=1.0,
    )
    c.lora = common.lora_config()
    c.textual_inversion = common.textual_inversion_config()
    c.dreambooth = common.dreambooth_config()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = ml_collections.ConfigDict(dict(min_size=2 ** 14, rules=()))
    c.data = common.data_config()
    c.init = common.init_config()
    c.distributed = ml_collections.ConfigDict(dict(enabled=False, coordinator_address="", num_processes=0,
                                                   process_id=-1))
    return c
