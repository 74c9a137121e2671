"""The SD v2 diffusion training recipe (2-base): 550k steps at 256 px then 850k at 512 px, batch
2048, the loop and optimizer settings of ``sd_v1_train``.

The released 2-base model predicts epsilon at 512 px (the 768-v models continue with v prediction:
``--config.train.prediction_type=v_prediction``, as MLPerf's SD v2 benchmark trains from scratch).
Run: ``ldm-jax train --config sd_v2_train --workdir DIR --config.init.pretrained=...``.
"""
from ldm_jax.configs import sd_v1_train, sd_v2


def get_config():
    c = sd_v1_train.get_config()
    v2 = sd_v2.get_config()
    for key in ("unet", "vae", "text_encoder", "scheduler", "sample", "tokenizer"):
        c[key] = v2[key]
    c.scheduler.prediction_type = "epsilon"  # 2-base; sd_v2 describes the 768-v model
    c.name = "sd_v2_train"
    c.stages = [
        dict(resolution=256, steps=550_000, batch_size=2048),
        dict(resolution=512, steps=850_000, batch_size=2048),
    ]
    return c
