"""Defaults shared by the training recipes: the training loop's settings and the data section.

Every field a trainer reads is defined here or in the recipe, so code reads ``config.x`` directly
and any field can be overridden on the command line.
"""
import ml_collections


def loop_config(**overrides) -> ml_collections.ConfigDict:
    """``config.train`` fields of the one training loop (:mod:`ldm_jax.train.loop`), shared by every task.

    None of them changes the compiled train step except ``compiler_options``.
    """
    c = ml_collections.ConfigDict(dict(
        seed=0,  # parameter init and every step's randomness (fold_in(rng, step))
        log_every=50,  # TensorBoard scalars and the progress bar
        checkpoint_every=2_000,
        keep_checkpoints=3,  # the most recent ones
        keep_every=0,  # also keep every step divisible by this forever (0: off)
        async_checkpoints=True,
        preemption_check_every=10,  # multi-host: steps between agreeing on a SIGTERM (a collective)
        tensorboard=True,
        progress=True,
        preview_every=0,  # images to TensorBoard (EMA samples, reconstructions); 0: off
        preview_count=8,
        prefetch=2,  # global batches on the devices ahead of the step (0 or 1: read when the step needs it)
        # Divergence: the run stops with an error (nothing saved after the divergence) when this many
        # steps in a row were non-finite (skipped), or more than max_skipped_fraction of the last 100
        # steps (checked from the 20th step on); 0 turns either check off.
        max_consecutive_skipped=100,
        max_skipped_fraction=0.5,
        compilation_cache_dir="",  # persistent XLA cache: restarts (preemption, resume) skip compiling
        # XLA options of the jitted init and step: None for the backend's defaults (plus the CPU tuning
        # when the entry point opted in, ldm_jax.runtime); a dict for exactly these options, e.g.
        # {"xla_backend_optimization_level": 0} for faster CPU compiles in tests.
        compiler_options=ml_collections.config_dict.placeholder(dict),
    ))
    c.update(overrides)
    return c


LOOP_KEYS = frozenset(loop_config().keys()) - {"seed", "compiler_options"}  # keys that never change a compile


def lora_config(**overrides) -> ml_collections.ConfigDict:
    """``config.lora``: the adapters of ``train.trainable="lora"`` (:mod:`ldm_jax.models.lora`)."""
    c = ml_collections.ConfigDict(dict(
        rank=4,
        alpha=4.0,  # the adapter's output is scaled by alpha / rank
        dropout=0.0,  # on the adapter's input, in training
        init="gaussian",  # down ~ N(0, 1/rank^2) (diffusers' scripts) | "kaiming" (PEFT's default); up = 0
        # regular expressions over the '/'-joined layer paths (Dense and 1x1 conv layers)
        unet_targets=r"attn[12]/(to_q|to_k|to_v|to_out_0)$",  # the attention projections
        text_targets="",  # e.g. r"self_attn/(q_proj|k_proj|v_proj|out_proj)$": adapters on CLIP too
        base_dtype="float32",  # the frozen base UNet's storage: "bfloat16" halves its memory
    ))
    c.update(overrides)
    return c


def textual_inversion_config(**overrides) -> ml_collections.ConfigDict:
    """``config.textual_inversion``: the placeholder of ``train.trainable="textual_inversion"``."""
    c = ml_collections.ConfigDict(dict(
        placeholder_token="<concept>",  # the new word; the training captions must contain it
        initializer_token="object",  # its vectors start as this word's embeddings
        num_vectors=1,  # vectors for the placeholder (tokens <concept>, <concept>_1, ...)
    ))
    c.update(overrides)
    return c


def dreambooth_config(**overrides) -> ml_collections.ConfigDict:
    """``config.dreambooth``: the prompts and prior preservation of ``data.source="dreambooth"``
    (:mod:`ldm_jax.train.dreambooth`; instance images from ``data.path``)."""
    c = ml_collections.ConfigDict(dict(
        instance_prompt="",  # e.g. "a photo of sks dog": every instance image's caption
        class_prompt="",  # e.g. "a photo of dog": the prior-preservation images' caption
        num_class_images=100,  # 0: no prior preservation
        prior_loss_weight=1.0,
        class_data_dir="",  # class images to use (and to fill up); "": <workdir>/class_images
        sample_steps=50,  # DDIM steps and guidance of the generated class images
        guidance=7.5,
        sample_batch=4,
    ))
    c.update(overrides)
    return c


def init_config(**overrides) -> ml_collections.ConfigDict:
    """``config.init``: released weights a run starts from (:mod:`ldm_jax.train.pretrained`)."""
    c = ml_collections.ConfigDict(dict(
        # a diffusers folder, a hub id, an original single-file checkpoint or an ldm_jax training workdir
        # (local or gs://): diffusion takes its tokenizer, text encoder and VAE (architecture, weights,
        # scaling factor) and its scheduler as the frozen models; the autoencoder task takes its VAE
        pretrained="",
        unet="random",  # "pretrained": the UNet (and its EMA) from `pretrained` too, to fine-tune it
        # diffusion: the frozen VAE (and its config) from this source instead: an autoencoder training workdir
        # (the first stage trained with `ldm-jax train --config ..._autoencoder`) or any model source
        vae="",
        vae_scaling_factor=0.0,  # > 0: the latents' scale for that VAE (LDM: 1 / std of the first batch's latents)
        allow_pickle=False,  # a pickled .ckpt/.bin source (unpickling runs code)
        random_encoders=False,  # no `pretrained`: train against random frozen encoders on purpose (tests)
    ))
    c.update(overrides)
    return c


def data_config(**overrides) -> ml_collections.ConfigDict:
    """``config.data``: where batches come from (:func:`ldm_jax.data.batches.make_batches`)."""
    c = ml_collections.ConfigDict(dict(
        # synthetic | synthetic_latents (in-memory class patterns, ldm_jax.data.synthetic) |
        # folder | tar | tfds | shapes (ldm_jax.data.sources.make_source)
        source="synthetic",
        cached_latents="",  # diffusion: an `ldm-jax encode-dataset` folder, read instead of `source`
        seed=0,  # shuffling and augmentation
        num_threads=2,
        image_size=256,  # autoencoder: training crop (diffusion: each stage's resolution)
        random_crop=False,
        random_flip=False,
        path="", captions_file="",  # folder
        captions_dir="",  # folder: .txt captions mirroring path/images (or path); "" with path/{images,text}: text
        caption_lines=True,  # folder: each non-empty .txt line is one caption, one drawn per epoch (False: whole file)
        shards="",  # tar: a glob or a list
        name="", split="train", data_dir="", image_key="", caption_key="",  # tfds (data_dir, split: shapes too)
        num_train=2000, num_validation=200, num_heldout=200, dataset_seed=0, max_shapes=2, shape_scale=1.0,  # shapes
        num_examples=256, num_classes=8,  # synthetic
    ))
    c.update(overrides)
    return c
