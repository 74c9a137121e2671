"""Latent diffusion training, as a task of the one training loop (:mod:`ldm_jax.train.loop`).

One step (:func:`make_train_step`), all randomness from ``fold_in(state.rng, state.step)``, all
diffusion math from :mod:`ldm_jax.diffusion.schedules`:

  x0      = vae.encode(image).sample() * scaling_factor    (or precomputed ``batch["latents"]``;
            cached posterior ``batch["moments"]`` of ``ldm-jax encode-dataset``: a fresh sample)
  ids     = input_ids with each row replaced by the empty prompt with prob. ``text_dropout``
  context = text_encoder(ids).context                        (frozen; or cached ``batch["context"]``
            with the dropped rows replaced by the empty prompt's)
  t ~ U{0..T-1}, eps ~ N(0, I), x_t = add_noise(x0, eps, t)
  loss    = mean_b w_b * mean_{hwc} (unet(x_t, t, context) - training_target(x0, eps, t))^2,
            w_b = 1 or min_snr_weights(t, gamma)
  AdamW (warm-up, global-norm clip) on the UNet; EMA min(decay, (1+n)/(10+n)); a non-finite
  loss or gradient leaves params/optimizer/EMA untouched and counts the step as skipped.

Fine-tuning (docs/finetune.md): ``config.train.trainable="lora"``: the state's params (and EMA,
optimizer state) are LoRA adapters only (``{"unet": ..., "text_encoder": ...}``,
:mod:`ldm_jax.models.lora`), the UNet they adapt frozen in the aux (``frozen["unet"]``,
``config.lora.base_dtype``); text-encoder adapters (``config.lora.text_targets``) re-encode the
prompts inside the differentiated loss. ``"textual_inversion"``: the placeholder's embedding rows
only (:mod:`ldm_jax.models.textual_inversion`), the tokenizer and the text encoder's table grown.
``config.data.source="dreambooth"`` (:mod:`ldm_jax.train.dreambooth`): instance and generated class
images with per-row ``loss_weight`` (prior preservation).

The same random numbers are drawn for the global batch whatever the mesh
(``jax_threefry_partitionable``), so sharded and single-device runs agree to float rounding.
Entry point: :func:`train` (or ``ldm-jax train --config sd_v1_train``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ldm_jax.data.batches import make_batches
from ldm_jax.diffusion.samplers import get_sampler_from_config
from ldm_jax.diffusion.sampling import denoise, guided
from ldm_jax.diffusion.schedules import NoiseSchedule, add_noise, make_schedule, min_snr_weights, training_target
from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm_jax.models import lora as lora_lib
from ldm_jax.models.text_encoder import check_padding, context_width, text_encoder_from_config
from ldm_jax.models.remat import policy_name
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.train import loop, optim
from ldm_jax.train import workdir as workdir_lib
from ldm_jax.train.loop import Stage, stage_index
from ldm_jax.train.writers import image_grid

__all__ = [
    "TrainState",
    "DiffusionModels",
    "DiffusionTask",
    "Stage",
    "build_models",
    "prediction_type",
    "noise_schedule",
    "empty_prompt_ids",
    "prompt_tokenizer",
    "text_dropout",
    "encode_conditioning",
    "make_optimizer",
    "trainable",
    "placeholder_ids",
    "adapted_weights",
    "make_training_inputs",
    "make_train_step",
    "create_train_state",
    "make_sampler",
    "get_stages",
    "stage_cached_latents",
    "check_cached_latents",
    "make_batch_source",
    "setup",
    "abstract_train_state",
    "train",
]

Array = jax.Array
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (the frozen encoders' params live in the aux)."""

    step: Array  # int32 scalar: steps taken (batches consumed)
    params: Any  # trainable UNet params (fp32 master copy)
    ema_params: Any
    opt_state: Any
    rng: Array  # raw uint32 key; the key of step s is fold_in(rng, s)
    stage: Array  # int32: progressive-resolution stage of the last step
    skipped_steps: Array  # int32: non-finite steps skipped so far


class DiffusionModels(NamedTuple):
    unet: nn.Module
    text_encoder: nn.Module
    vae: nn.Module | None  # None when training on precomputed latents


# ----------------------------------------------------------------------------------------------
# Pieces


def _uses_latents(config) -> bool:
    return config.data.source == "synthetic_latents"


def build_models(config) -> DiffusionModels:
    """UNet (trainable, ``config.train.compute_dtype``, ``remat`` policy), text encoder (frozen unless
    ``train.train_text_encoder``; CLIP or LDMBert, :mod:`ldm_jax.models.text_encoder`) and frozen VAE.

    The VAE is skipped when ``config.data.source`` yields precomputed latents.
    """
    t = config.train
    dtype = _DTYPES[t.compute_dtype]
    unet = UNet2DConditionModel(**dict(config.unet), dtype=dtype, remat=policy_name(t.remat))
    text = text_encoder_from_config(dict(config.text_encoder), dtype=dtype)
    vae = None if _uses_latents(config) else AutoencoderKL(**dict(config.vae), dtype=dtype)
    return DiffusionModels(unet, text, vae)


def prediction_type(config) -> str:
    """What the UNet learns to predict: ``config.train.prediction_type`` when set, else the scheduler's."""
    prediction = config.train.prediction_type or dict(config.scheduler).get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction!r}")
    return prediction


def noise_schedule(config) -> NoiseSchedule:
    """The diffusion process of ``config.scheduler``, predicting :func:`prediction_type`."""
    return make_schedule(**dict(config.scheduler, prediction_type=prediction_type(config)))


def empty_prompt_ids(config) -> np.ndarray:
    """Token ids ``[77]`` of the empty prompt ``""`` (``[BOS, EOS, pad, ...]``).

    From ``config.train.empty_prompt_ids`` if set, else the tokenizer ``config.tokenizer``, else
    CLIP's layout from the vocabulary (BOS = vocab-2, EOS = pad = vocab-1).
    """
    explicit = config.train.empty_prompt_ids
    if explicit is not None:
        return np.asarray(explicit, np.int32)
    length = _text_length(config)
    if config.tokenizer:
        return np.asarray(prompt_tokenizer(config)([""]), np.int32).reshape(-1)[:length]
    vocab = config.text_encoder.vocab_size
    ids = np.full((length,), vocab - 1, np.int32)
    ids[0] = vocab - 2
    return ids


def prompt_tokenizer(config):
    """``config.tokenizer`` as a :class:`~ldm_jax.models.tokenizer.PromptTokenizer`, with a textual-inversion
    run's placeholder added (None without a tokenizer)."""
    if not config.tokenizer:
        return None
    from ldm_jax.models.tokenizer import PromptTokenizer

    tok = PromptTokenizer.from_pretrained(config.tokenizer)
    if config.train.trainable == "textual_inversion" and config.textual_inversion.placeholder_token not in tok.placeholders:
        ti = config.textual_inversion
        tok.add_placeholder(ti.placeholder_token, int(ti.num_vectors))
    return tok


def text_dropout(key: Array, input_ids: Array, empty_ids: Array, rate: float) -> tuple[Array, Array]:
    """Replace each row of ``input_ids [B, L]`` by ``empty_ids [L]`` with probability ``rate``.

    Returns ``(ids [B, L], dropped [B] bool)``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"text_dropout rate must be in [0, 1], got {rate}")
    dropped = jax.random.bernoulli(key, rate, (input_ids.shape[0],))
    ids = jnp.where(dropped[:, None], empty_ids[None, :].astype(input_ids.dtype), input_ids)
    return ids, dropped


def encode_conditioning(text_encoder: nn.Module, text_params: Any, key: Array, input_ids: Array,
                        empty_ids: Array, rate: float) -> tuple[Array, Array]:
    """Text dropout then the frozen text encoder: ``(context [B, L, D], dropped [B])``."""
    ids, dropped = text_dropout(key, input_ids, empty_ids, rate)
    out = text_encoder.apply({"params": text_params}, ids)
    return jax.lax.stop_gradient(out.context), dropped


_TRAINABLE = ("unet", "lora", "textual_inversion")


def trainable(config) -> str:
    """What the run trains (``config.train.trainable``), its settings checked: ``"unet"`` (every UNet
    weight; with ``train.train_text_encoder`` the text encoder's too), ``"lora"`` (adapters,
    ``config.lora``) or ``"textual_inversion"`` (placeholder token embeddings, ``config.textual_inversion``);
    in the last two the UNet is frozen."""
    what = config.train.trainable
    if what not in _TRAINABLE:
        raise ValueError(f"config.train.trainable must be one of {_TRAINABLE}, got {what!r}")
    if config.train.train_text_encoder and what != "unet":
        raise ValueError(f"config.train.train_text_encoder trains the text encoder with the whole UNet "
                         f"(trainable='unet'), not with trainable={what!r}"
                         + (" (LoRA adapts the text encoder with config.lora.text_targets)" if what == "lora" else ""))
    lr_scale = float(config.train.text_encoder_lr_scale)
    trains_text = config.train.train_text_encoder if what == "unet" else what == "lora" and bool(config.lora.text_targets)
    if lr_scale != 1.0 and not (lr_scale > 0 and trains_text):
        raise ValueError(f"config.train.text_encoder_lr_scale={lr_scale:g} needs a trained text encoder "
                         "(train.train_text_encoder, or LoRA with lora.text_targets) and a factor > 0")
    if what == "lora":
        rank = config.lora.rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"config.lora.rank must be an integer >= 1, got {rank!r}")
        if not 0.0 <= float(config.lora.dropout) < 1.0:
            raise ValueError(f"config.lora.dropout must be in [0, 1), got {config.lora.dropout}")
        if config.lora.base_dtype not in _DTYPES:
            raise ValueError(f"config.lora.base_dtype must be one of {sorted(_DTYPES)}, got {config.lora.base_dtype!r}")
    if what == "textual_inversion":
        from ldm_jax.models.textual_inversion import placeholder_tokens

        ti = config.textual_inversion
        placeholder_tokens(ti.placeholder_token, ti.num_vectors)  # a bad token or count: one line
        if not config.tokenizer:
            raise ValueError("textual inversion adds its placeholder to the tokenizer: config.tokenizer (or "
                             "config.init.pretrained's) must name one")
    return what


def check_zero_padding(config) -> None:
    """:func:`~ldm_jax.models.text_encoder.check_padding` of the run's text encoder and tokenizer (read
    only when the encoder zeroes its padding)."""
    if dict(config.text_encoder).get("zero_padding"):
        check_padding(text_encoder_from_config(dict(config.text_encoder)), prompt_tokenizer(config))


def _lora_scale(config) -> float:
    return float(config.lora.alpha) / int(config.lora.rank)


def placeholder_ids(config) -> np.ndarray:
    """The token ids of a textual-inversion run's placeholder: the last ``num_vectors`` rows of its
    (grown) text-encoder vocabulary."""
    n, vocab = int(config.textual_inversion.num_vectors), int(config.text_encoder.vocab_size)
    return np.arange(vocab - n, vocab, dtype=np.int32)


def joint_text(config) -> bool:
    """Whether the text encoder trains with the UNet: then a state's params are ``{"unet", "text_encoder"}``."""
    return bool(config.train.train_text_encoder)


def adapted_weights(config, params, frozen) -> tuple[Any, Any]:
    """``(UNet params, text-encoder params)`` that a state's ``params`` (or ``ema_params``) stand for:
    the params themselves and the frozen text encoder (both params, trained jointly); (LoRA) the frozen
    base weights with the adapters merged at ``alpha / rank``; (textual inversion) the frozen UNet and
    the learned placeholder rows."""
    what = trainable(config)
    if what == "unet":
        if joint_text(config):
            return params["unet"], params["text_encoder"]
        return params, frozen["text"]
    if what == "textual_inversion":
        from ldm_jax.models.textual_inversion import with_rows

        return frozen["unet"], with_rows(frozen["text"], placeholder_ids(config), params["token_embeds"])
    scale = _lora_scale(config)
    text = frozen["text"]
    if params["text_encoder"]:
        text = lora_lib.merge(text, [(params["text_encoder"], scale)])
    return lora_lib.merge(frozen["unet"], [(params["unet"], scale)]), text


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW + warm-up (+ cosine decay over ``train.decay_steps`` updates when set) + clipping from
    ``config.train`` and its learning-rate schedule."""
    t = config.train
    tx = optim.make_optimizer(t.lr, t.warmup_steps, b1=t.b1, b2=t.b2, eps=t.adam_eps, weight_decay=t.weight_decay,
                              grad_clip_norm=t.grad_clip_norm, decay_steps=t.decay_steps, mu_dtype=t.mu_dtype,
                              group_lr_scales={"text_encoder": t.text_encoder_lr_scale})
    return tx, optim.learning_rate_schedule(t.lr, t.warmup_steps, t.decay_steps)


def get_stages(config) -> list[Stage]:
    """``config.stages`` (list of dicts with ``resolution``, ``steps``, ``batch_size``)."""
    stages = [Stage(int(s["resolution"]), int(s["steps"]), int(s["batch_size"]), i) for i, s in enumerate(config.stages)]
    if not stages or any(s.steps <= 0 or s.batch_size <= 0 or s.resolution <= 0 for s in stages):
        raise ValueError(f"config.stages needs >= 1 stage with positive resolution/steps/batch_size: {stages}")
    return stages


def _text_length(config) -> int:
    """Tokens per prompt (the text encoder's positions; CLIP's 77 unless its config says otherwise)."""
    return int(config.text_encoder.get("max_position_embeddings", 77))


def _scaling_factor(config) -> float:
    """The latents' scale (SD's 0.18215 unless the VAE config says otherwise)."""
    return float(config.vae.get("scaling_factor", 0.18215))


def _latent_factor(config) -> int:
    return 2 ** (len(config.vae.block_out_channels) - 1)


def make_training_inputs(config, models: DiffusionModels, encode: bool = True) -> Callable:
    """Pure ``inputs(batch, frozen, key) -> (x_t, timesteps, context, target, weights, dropped)``: what one
    training step feeds the UNet and compares its output with (see the module docstring), drawn
    from ``key`` (a step's key: ``fold_in(state.rng, state.step)``). ``encode=False``: the caller encodes
    the prompts itself (a trained text side): ``context`` is None, ``dropped`` the same draw."""
    prediction_type(config)  # a bad one fails here, before tracing
    gamma = float(config.train.min_snr_gamma)
    rate = float(config.train.text_dropout)
    _, text_encoder, vae = models
    scale = _scaling_factor(config)

    def inputs(batch: Mapping[str, Array], frozen: Mapping[str, Any], key: Array):
        process = noise_schedule(config)  # its arrays are constants of this trace
        k_drop, k_post, k_t, k_eps = jax.random.split(key, 4)
        if "latents" in batch:
            x0 = batch["latents"].astype(jnp.float32)
        elif "moments" in batch:  # cached posterior (encode-dataset): the same draw as from "image"
            x0 = DiagonalGaussian.from_moments(batch["moments"].astype(jnp.float32)).sample(k_post) * scale
        else:
            if vae is None:
                raise ValueError("batch has no 'latents' and no VAE was given to encode 'image'")
            posterior = vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
            x0 = posterior.sample(k_post).astype(jnp.float32) * scale
        x0 = jax.lax.stop_gradient(x0)
        b = x0.shape[0]
        if "context" in batch:  # cached conditioning: dropped rows get the empty prompt's
            dropped = jax.random.bernoulli(k_drop, rate, (b,))  # the draw of text_dropout
            empty = text_encoder.apply({"params": frozen["text"]}, frozen["empty_ids"][None]).context
            context = jnp.where(dropped[:, None, None], empty.astype(jnp.float32), batch["context"].astype(jnp.float32))
            context = jax.lax.stop_gradient(context)
        elif encode:
            context, dropped = encode_conditioning(text_encoder, frozen["text"], k_drop, batch["input_ids"],
                                                   frozen["empty_ids"], rate)
        else:
            context, dropped = None, text_dropout(k_drop, batch["input_ids"], frozen["empty_ids"], rate)[1]
        timesteps = jax.random.randint(k_t, (b,), 0, process.num_train_timesteps)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        x_t = add_noise(process, x0, eps, timesteps)
        target = training_target(process, x0, eps, timesteps)
        weights = min_snr_weights(process, timesteps, gamma)
        return x_t, timesteps, context, target, weights, dropped

    return inputs


def make_train_step(config, models: DiffusionModels, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable:
    """Pure ``train_step(state, batch, frozen) -> (state, metrics)``.

    ``batch``: ``image [B,H,W,3]`` in [-1, 1] (or ``latents [B,h,w,C]``, or cached VAE ``moments
    [B,h,w,2C]``) and ``input_ids [B,77]`` (or cached text-encoder ``context [B,77,D]``).
    ``frozen``: ``{"text": params, "vae": params or None, "empty_ids": int32 [77]}``.
    ``metrics``: scalars ``loss, grad_norm, lr, ema_decay, skipped, skipped_steps, text_dropped``.
    ``schedule``: the optimizer's learning-rate schedule (for the ``lr`` metric).
    """
    t = config.train
    accum = int(t.grad_accum_steps)
    decay, ema_warmup = float(t.ema_decay), bool(t.ema_warmup)
    stages = get_stages(config)
    unet, text_encoder = models.unet, models.text_encoder
    what = trainable(config)
    lora, joint = what == "lora", joint_text(config)
    # the prompts go through the text encoder inside the gradient: its weights, adapters or new embeddings train
    encode_in_loss = (lora and bool(config.lora.text_targets)) or what == "textual_inversion" or joint
    training_inputs = make_training_inputs(config, models, encode=not encode_in_loss)
    scale = _lora_scale(config) if lora else 1.0
    dropout = float(config.lora.dropout) if lora else 0.0
    new_ids = placeholder_ids(config) if what == "textual_inversion" else None

    def predict(params, frozen, key, x_t, timesteps, context, ids):
        if joint:
            context = text_encoder.apply({"params": params["text_encoder"]}, ids).context.astype(unet.dtype)
            return unet.apply({"params": params["unet"]}, x_t, timesteps, context)
        if what == "unet":
            return unet.apply({"params": params}, x_t, timesteps, context)
        if what == "textual_inversion":
            from ldm_jax.models.textual_inversion import with_rows

            text = with_rows(frozen["text"], new_ids, params["token_embeds"])
            context = text_encoder.apply({"params": text}, ids).context.astype(unet.dtype)
            return unet.apply({"params": frozen["unet"]}, x_t, timesteps, context)
        k_unet, k_text = jax.random.split(key)
        if encode_in_loss:
            with lora_lib.adapted(params["text_encoder"], scale, dropout=dropout, key=k_text):
                context = text_encoder.apply({"params": frozen["text"]}, ids).context.astype(unet.dtype)
        with lora_lib.adapted(params["unet"], scale, dropout=dropout, key=k_unet):
            return unet.apply({"params": frozen["unet"]}, x_t, timesteps, context)

    def loss_fn(params, frozen, key, x_t, timesteps, context, target, weights, ids):
        pred = predict(params, frozen, key, x_t, timesteps, context, ids).astype(jnp.float32)
        per_example = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
        return jnp.mean(weights * per_example)

    def train_step(state: TrainState, batch: Mapping[str, Array], frozen: Mapping[str, Any]):
        if encode_in_loss and ("input_ids" not in batch or "context" in batch):
            raise ValueError(f"training the text side ({'text encoder' if joint else what}) needs the prompts' "
                             f"input_ids, not cached text context: train without data.cached_latents")
        key = jax.random.fold_in(state.rng, state.step)
        x_t, timesteps, context, target, weights, dropped = training_inputs(batch, frozen, key)
        if "loss_weight" in batch:  # per-row weights of the source (DreamBooth's prior preservation)
            weights = weights * batch["loss_weight"].astype(jnp.float32)
        b = x_t.shape[0]
        ids = jnp.zeros((b, 1), jnp.int32)  # the prompts' ids, when text-encoder adapters re-encode them
        if encode_in_loss:
            ids = jnp.where(dropped[:, None], frozen["empty_ids"][None].astype(batch["input_ids"].dtype),
                            batch["input_ids"])
        key = jax.random.fold_in(key, 1)  # the adapters' dropout (training_inputs split the step key in 4)
        if context is None:  # encoded inside the loss; a placeholder of the right rows for the micro-batch split
            context = jnp.zeros((b, 1, 1), unet.dtype)
        inputs = (x_t, timesteps, context.astype(unet.dtype), target, weights, ids)
        if accum == 1:
            loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, key, *inputs)
        else:
            if b % accum:
                raise ValueError(f"batch {b} is not divisible by grad_accum_steps {accum}")
            # Row i*accum + a goes to micro-batch a: each device keeps its rows (no resharding).
            micro = jax.tree.map(lambda x: x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1), inputs)

            def body(carry, mb):
                (i, *mb) = mb
                l, g = jax.value_and_grad(loss_fn)(state.params, frozen, jax.random.fold_in(key, i), *mb)
                return jax.tree.map(jnp.add, carry, (l, g)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), *micro))
            loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        num_updates = state.step - state.skipped_steps + 1
        d = optim.ema_decay(num_updates, decay, ema_warmup)
        new_ema = optim.ema_update(state.ema_params, new_params, d)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        skipped = state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            ema_params=keep(new_ema, state.ema_params),
            opt_state=keep(new_opt, state.opt_state),
            stage=stage_index(stages, state.step),
            skipped_steps=skipped,
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step - state.skipped_steps),
            "ema_decay": d,
            "skipped": (~finite).astype(jnp.int32),
            "skipped_steps": skipped,
            "text_dropped": jnp.mean(dropped.astype(jnp.float32)),
        }
        return new_state, metrics

    return train_step


def _init_params(module, key: Array, *inputs, given: bool = False):
    """``module``'s params: random, or zeros when the caller puts given (pretrained) values in their place
    (a program of zeros compiles in a moment where the random initializers take seconds)."""
    init = lambda k: module.init(k, *inputs)["params"]  # noqa: E731
    if not given:
        return init(key)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init, key))


def create_train_state(config, models: DiffusionModels, key: Array, latent_shape: tuple[int, ...],
                       tx: optax.GradientTransformation, image_shape: tuple[int, ...] | None = None,
                       given: frozenset = frozenset()) -> tuple[TrainState, dict]:
    """Fresh ``(state, frozen)``: random UNet (EMA = copy), random frozen encoders, empty-prompt ids.

    ``given``: the networks (``"unet"``, ``"text"``, ``"vae"``) whose weights the caller replaces (pretrained
    ones, see :meth:`DiffusionTask.prepare_state` / ``prepare_aux``): zeros of their shapes, not drawn.
    Jit it with ``out_shardings`` to create the params directly sharded.
    """
    k_unet, k_text, k_vae, k_rng = jax.random.split(key, 4)
    unet, text_encoder, vae = models
    b = latent_shape[0]
    ctx_dim = context_width(config.text_encoder)
    ids = jnp.zeros((b, _text_length(config)), jnp.int32)
    params = _init_params(unet, k_unet, jnp.zeros(latent_shape, jnp.float32), jnp.zeros((b,), jnp.int32),
                          jnp.zeros((b, ids.shape[1], ctx_dim), jnp.float32), given="unet" in given)
    frozen = {"text": _init_params(text_encoder, k_text, ids, given="text" in given),
              # encoder and decoder (the decoder renders the previews)
              "vae": None if vae is None else _init_params(vae, k_vae, jnp.zeros(image_shape, jnp.float32),
                                                          given="vae" in given),
              "empty_ids": jnp.asarray(empty_prompt_ids(config))}
    what = trainable(config)
    if joint_text(config):  # the text encoder trains: beside the UNet in params, EMA and optimizer state
        params, frozen["text"] = {"unet": params, "text_encoder": frozen["text"]}, None
    if what == "textual_inversion":  # UNet and text encoder frozen; the placeholder rows train
        frozen["unet"] = params
        rows = jnp.zeros((int(config.textual_inversion.num_vectors), ctx_dim), jnp.float32)
        params = {"token_embeds": rows}  # the initializer word's embeddings: DiffusionTask.prepare_state
    if what == "lora":  # the UNet is the frozen base; the adapters are what trains
        lc = config.lora
        k_lora_unet, k_lora_text = jax.random.split(jax.random.fold_in(k_unet, 1))
        frozen["unet"] = jax.tree.map(lambda p: p.astype(_DTYPES[lc.base_dtype]), params)
        params = {"unet": lora_lib.init_adapters(k_lora_unet, params, lc.unet_targets, lc.rank, lc.init),
                  "text_encoder": lora_lib.init_adapters(k_lora_text, frozen["text"], lc.text_targets, lc.rank,
                                                         lc.init) if lc.text_targets else {}}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                       rng=k_rng, stage=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))
    return state, frozen


def make_sampler(config, models: DiffusionModels, num_steps: int = 20, guidance_scale: float = 5.0) -> Callable:
    """``sample(ema_params, frozen, key, input_ids [N,77], latent_shape) -> images [N,H,W,3]`` in [-1, 1]
    (``key``: one key, or one per sample ``[N, 2]``).

    The pipeline's denoising loop (:func:`ldm_jax.diffusion.denoise`, :func:`~ldm_jax.diffusion.guided`)
    with deterministic DDIM and the empty prompt as the negative, for the training previews; decodes
    with the VAE (latent channels 0..2 without one).
    """
    scheduler = dict(config.scheduler, prediction_type=prediction_type(config))
    sampler = get_sampler_from_config("ddim", scheduler, num_steps)
    unet, text_encoder, vae = models
    scale = _scaling_factor(config)

    def sample(ema_params, frozen, key, input_ids, latent_shape):
        n = input_ids.shape[0]
        unet_params, text_params = adapted_weights(config, ema_params, frozen)
        # one (empty prompt, prompt) context pair per sample: the UNet runs its first layers once per sample
        ids = jnp.stack([jnp.broadcast_to(frozen["empty_ids"], input_ids.shape), input_ids], axis=1)
        context = text_encoder.apply({"params": text_params}, ids.reshape(2 * n, -1)).context
        if key.ndim > 1:  # a key per sample: each image depends on its own key only
            x = jax.vmap(lambda k: jax.random.normal(k, tuple(latent_shape), jnp.float32))(key)
        else:
            x = jax.random.normal(key, (n,) + tuple(latent_shape), jnp.float32)
        x = x * sampler.init_noise_sigma
        apply = lambda x_in, t: unet.apply({"params": unet_params}, x_in, t, context).astype(jnp.float32)  # noqa: E731
        x = denoise(sampler, guided(apply, guidance_scale), x)
        if vae is None:
            return jnp.clip(x[..., :3], -1, 1)
        return jnp.clip(vae.apply({"params": frozen["vae"]}, x / scale, method="decode"), -1, 1)

    return sample


def stage_cached_latents(config, stage: Stage) -> str:
    """The cached latents of ``stage``: ``config.data.cached_latents`` names one folder for every stage,
    or one per stage, comma-separated (``gs://b/lat256,gs://b/lat512``); "" when not set."""
    caches = [c.strip() for c in str(config.data.cached_latents).split(",") if c.strip()]
    if len(caches) > 1 and len(caches) != len(config.stages):
        raise ValueError(f"config.data.cached_latents names {len(caches)} folders for {len(config.stages)} stages "
                         f"(give one for every stage, or one per stage)")
    return caches[stage.index] if len(caches) > 1 else (caches[0] if caches else "")


def check_cached_latents(config) -> None:
    """Every stage's cached latents exist, are complete and were encoded at the stage's resolution:
    checked when a run starts (reading metadata only), not when the stage is reached."""
    from ldm_jax.data.latents import read_cache_metadata

    for stage in get_stages(config):
        cache = stage_cached_latents(config, stage)
        if not cache:
            continue
        try:
            size = int(read_cache_metadata(cache)["image_size"])
        except (ValueError, OSError) as e:
            raise ValueError(f"config.data.cached_latents for stage {stage.index} ({stage.resolution} px): "
                             f"{e}") from None
        if size != stage.resolution:
            raise ValueError(f"config.data.cached_latents {cache!r} was encoded at {size} px; stage {stage.index} "
                             f"trains at {stage.resolution} px (name one folder per stage, comma-separated)")


def make_batch_source(config, stage: Stage, rows: tuple[int, int], workdir: str | None = None) -> Iterator[dict]:
    """This process's rows ``[start, stop)`` of each global batch of ``stage``
    (:func:`ldm_jax.data.batches.make_batches` of ``config.data`` with the stage's cached latents;
    captions tokenized with ``config.tokenizer``)."""
    if config.data.source == "dreambooth":
        return _dreambooth_batches(config, stage, rows, workdir)
    data = config.data.copy_and_resolve_references()
    data.cached_latents = stage_cached_latents(config, stage)
    tokenizer = None
    if config.tokenizer and not (data.cached_latents or data.source in ("synthetic", "synthetic_latents")):
        tokenizer = prompt_tokenizer(config)
    return make_batches(data, global_batch_size=stage.batch_size, image_size=stage.resolution, rows=rows,
                        tokenizer=tokenizer, text_length=_text_length(config),
                        vocab_size=config.text_encoder.vocab_size, latent_channels=config.unet.in_channels,
                        workdir=workdir)


def _dreambooth_batches(config, stage: Stage, rows, workdir):
    from ldm_jax.train import dreambooth

    db, tok = config.dreambooth, prompt_tokenizer(config)
    paths = dreambooth.check_config(config)
    instance = dreambooth.load_images(paths, stage.resolution, "instance")
    classes, class_ids = None, None
    if int(db.num_class_images) > 0:
        found = dreambooth.list_images(dreambooth.class_images_dir(config, workdir))[: int(db.num_class_images)]
        if len(found) < int(db.num_class_images):
            raise ValueError(f"{len(found)} class images in {dreambooth.class_images_dir(config, workdir)!r}, "
                             f"config.dreambooth.num_class_images={db.num_class_images}")
        classes, class_ids = dreambooth.load_images(found, stage.resolution, "class"), tok([db.class_prompt])[0]
    return dreambooth.DreamBoothBatches(instance, tok([db.instance_prompt])[0], classes, class_ids, stage.batch_size,
                                        rows, seed=int(config.data.seed), prior_loss_weight=float(db.prior_loss_weight))


def _cast_like(params, like, what: str = "unet"):
    """``params`` (numpy, any float dtype) as ``like``'s dtypes; ValueError naming a leaf whose shape differs."""
    def cast(path, p, ref):
        if tuple(np.shape(p)) != tuple(ref.shape):
            raise ValueError(f"pretrained {what} parameter {jax.tree_util.keystr(path)} has shape {np.shape(p)}; "
                             f"config.{what} gives {ref.shape}")
        return np.asarray(p, ref.dtype)

    if jax.tree.structure(params) != jax.tree.structure(like):
        raise ValueError(f"the pretrained {what}'s parameters do not match config.{what}'s tree")
    return jax.tree_util.tree_map_with_path(cast, params, like)


# ----------------------------------------------------------------------------------------------
# The task


class DiffusionTask(loop.Task):
    """The text-conditioned UNet trained on latents of frozen encoders.

    The frozen encoders come from ``config.init.pretrained`` (:mod:`ldm_jax.train.pretrained`:
    the source's tokenizer, text encoder, VAE and scheduler; with ``init.unet="pretrained"`` its UNet
    too), or from ``frozen``; random ones only with ``init.random_encoders=True``.

    Args:
      config: a diffusion training config (``sd_v1_train``).
      frozen: in-memory frozen ``{"text": params, "vae": params}`` (instead of ``init.pretrained``).
      models: prebuilt :class:`DiffusionModels` (default :func:`build_models`).
      batch_source_fn: ``(config, stage, rows) -> iterator`` (default :func:`make_batch_source`).
    """

    name = "diffusion"

    def __init__(self, config, *, frozen: dict | None = None, models: DiffusionModels | None = None,
                 batch_source_fn: Callable[[Any, Stage, tuple[int, int]], Iterator] | None = None):
        super().__init__(config)
        self.frozen, self.batch_source_fn = frozen, batch_source_fn
        self.models, self._models_given = models, models is not None
        self._pretrained = None
        self._preview = None

    def start(self):
        if self._pretrained is not None:
            return
        if self.frozen is not None:  # the caller's own frozen encoders
            from ldm_jax.train.pretrained import Pretrained, check_compatible

            check_compatible(self.config)
            self._pretrained = Pretrained(self.config)
        else:
            from ldm_jax.train.pretrained import resolve_diffusion

            self._pretrained = resolve_diffusion(self.config)
            self.config = self._pretrained.config
            self.frozen = self._pretrained.frozen
        check_cached_latents(self.config)
        check_zero_padding(self.config)
        what = trainable(self.config)
        if what != "unet":
            p = self._pretrained
            if self.config.init.pretrained and p.unet is None:
                raise ValueError(f"config.train.trainable={what!r} adapts the pretrained UNet: set "
                                 f"config.init.unet='pretrained' (the {what} recipes do)")
            if p.unet is not None:  # the weights one samples (a workdir's EMA), frozen in the aux
                self.frozen = dict(self.frozen or {}, unet=p.unet_ema)
        if what == "textual_inversion":
            self._start_textual_inversion()
        if self.config.data.source == "dreambooth":
            from ldm_jax.train.dreambooth import check_config

            check_config(self.config)  # before anything compiles or is written
        self.models = self.models or build_models(self.config)
        self.tx, self.lr_schedule = make_optimizer(self.config)
        self._step = make_train_step(self.config, self.models, self.tx, self.lr_schedule)

    def _start_textual_inversion(self):
        """The placeholder's tokens follow the text encoder's vocabulary: it grows by ``num_vectors`` rows."""
        ti, c = self.config.textual_inversion, self.config
        vocab = int(c.text_encoder.vocab_size)
        tok = prompt_tokenizer(c)
        ids = list(tok.tokenizer.convert_tokens_to_ids(tok.placeholders[ti.placeholder_token]))
        if ids != list(range(vocab, vocab + int(ti.num_vectors))):
            raise ValueError(f"the tokenizer ({len(tok.tokenizer) - len(ids)} tokens) does not end where the text "
                             f"encoder's vocabulary ({vocab}) does: the placeholder's ids {ids} would not be its new rows")
        self._init_ids = tok.tokenizer(str(ti.initializer_token), add_special_tokens=False).input_ids
        if not self._init_ids:
            raise ValueError(f"config.textual_inversion.initializer_token {ti.initializer_token!r} has no tokens")
        c.text_encoder.vocab_size = vocab + int(ti.num_vectors)

    def stages(self) -> list[Stage]:
        return get_stages(self.config)

    def cache_key(self):
        key = super().cache_key()
        return (key, self.models) if self._models_given else key

    def init(self, key):
        stage0 = self.stages()[0]
        c = self.config
        side = stage0.resolution if _uses_latents(c) else stage0.resolution // _latent_factor(c)
        latent_shape = (1, side, side, c.unet.in_channels)
        image_shape = (1, stage0.resolution, stage0.resolution, c.vae.in_channels)
        return create_train_state(c, self.models, key, latent_shape, self.tx, image_shape, self._given())

    def _given(self) -> frozenset:
        """The networks whose init values :meth:`prepare_state` / :meth:`prepare_aux` replace."""
        frozen = {k for k in ("text", "vae") if (self.frozen or {}).get(k) is not None}
        unet = self._pretrained is not None and self._pretrained.unet is not None
        return frozenset(frozen | ({"unet"} if unet else set()))

    def step(self, state, batch, aux):
        return self._step(state, batch, aux)

    def prepare_aux(self, aux, shardings):
        if self.frozen is None:
            return aux
        merged = dict(aux)
        # a jointly trained text encoder starts from the given weights in the state (prepare_state), not here
        merged.update({k: v for k, v in self.frozen.items() if v is not None and not (k == "text" and aux[k] is None)})
        if "unet" in self.frozen:  # the LoRA base, stored in config.lora.base_dtype
            merged["unet"] = _cast_like(self.frozen["unet"], aux["unet"])
        if trainable(self.config) == "textual_inversion" and self.frozen.get("text") is not None:
            merged["text"] = self._grown_text()
        return jax.device_put(merged, shardings)

    def _grown_text(self):
        """The pretrained text encoder with the placeholder's rows (the initializer's embeddings) appended."""
        from ldm_jax.models.textual_inversion import extend_embeddings, init_rows

        text = self.frozen["text"]
        return extend_embeddings(text, init_rows(text, self._init_ids, int(self.config.textual_inversion.num_vectors)))

    def prepare_state(self, state, shardings):
        p = self._pretrained
        what = trainable(self.config)
        if what == "textual_inversion" and self.frozen and self.frozen.get("text") is not None:
            from ldm_jax.models.textual_inversion import init_rows

            rows = init_rows(self.frozen["text"], self._init_ids, int(self.config.textual_inversion.num_vectors))
            params = {"token_embeds": jax.device_put(rows, shardings.params["token_embeds"])}
            return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
        if what != "unet":
            return state
        given_unet = p is not None and p.unet is not None
        if not joint_text(self.config):
            if not given_unet:
                return state
            return state.replace(params=jax.device_put(_cast_like(p.unet, state.params), shardings.params),
                                 ema_params=jax.device_put(_cast_like(p.unet_ema, state.ema_params),
                                                           shardings.ema_params))
        text = (self.frozen or {}).get("text")
        if not given_unet and text is None:
            return state

        def start(tree, unet):
            new = dict(tree)
            if given_unet:
                new["unet"] = _cast_like(unet, tree["unet"])
            if text is not None:
                new["text_encoder"] = _cast_like(text, tree["text_encoder"], "text_encoder")
            return new

        return state.replace(params=jax.device_put(start(state.params, p.unet if given_unet else None), shardings.params),
                             ema_params=jax.device_put(start(state.ema_params, p.unet_ema if given_unet else None),
                                                       shardings.ema_params))

    def batch_spec(self, stage, inputs: str | None = None):
        """``stage``'s global batch as ShapeDtypeStructs. ``inputs``: ``"images"`` (pixels encoded by
        the VAE in the step), ``"cached"`` (``ldm-jax encode-dataset`` moments and text context),
        ``"latents"`` (synthetic latents); default: what ``config.data`` gives."""
        c, b = self.config, stage.batch_size
        if inputs is None:
            inputs = ("latents" if _uses_latents(c) else "cached" if stage_cached_latents(c, stage) else "images")
        length, r = _text_length(c), stage.resolution
        side = r // _latent_factor(c)
        spec = {"input_ids": ((b, length), jnp.int32)}
        if inputs == "images":
            spec["image"] = ((b, r, r, c.vae.in_channels), jnp.float32)
        elif inputs == "cached":
            spec["moments"] = ((b, side, side, 2 * c.unet.in_channels), jnp.float32)
            spec["context"] = ((b, length, context_width(c.text_encoder)), jnp.float32)
        elif inputs == "latents":
            spec["latents"] = ((b, r, r, c.unet.in_channels), jnp.float32)
        else:
            raise ValueError(f"inputs must be 'images', 'cached' or 'latents', got {inputs!r}")
        if c.data.source == "dreambooth":
            spec["loss_weight"] = ((b,), jnp.float32)
        return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in spec.items()}

    def batches(self, stage, rows, workdir):
        if self.batch_source_fn is not None:
            return self.batch_source_fn(self.config, stage, rows)
        return make_batch_source(self.config, stage, rows, workdir)

    def write_workdir(self, workdir, aux):
        # frozen encoders and tokenizer: the workdir becomes a model source (load_model(workdir))
        if trainable(self.config) == "textual_inversion":  # the tokenizer with the placeholder
            workdir_lib.write_tokenizer(workdir, prompt_tokenizer(self.config))
        workdir_lib.write_frozen(workdir, self.config, aux)
        if self.config.data.source == "dreambooth" and int(self.config.dreambooth.num_class_images) > 0:
            self._generate_class_images(workdir, aux)

    def _generate_class_images(self, workdir, aux):
        """The prior-preservation images, from the model before any step (cached in the class folder)."""
        from ldm_jax.train import dreambooth
        from ldm_jax.train.sharding import replicated

        c, db = self.config, self.config.dreambooth
        folder = dreambooth.class_images_dir(c, workdir)
        if len(dreambooth.list_images(folder)) >= int(db.num_class_images):
            return
        mesh = jax.tree.leaves(aux)[0].sharding.mesh
        base = c.copy_and_resolve_references()
        base.train.trainable = "unet"  # sample the UNet given, not adapters
        base.train.train_text_encoder = False  # ... with the text encoder given
        unet = aux["unet"] if "unet" in aux else jax.device_put(self._pretrained.unet_ema, replicated(mesh))
        if aux["text"] is None:  # trained jointly: the class images come from the given text encoder
            aux = dict(aux, text=jax.device_put(self.frozen["text"], replicated(mesh)))
        run = jax.jit(make_sampler(base, self.models, int(db.sample_steps), float(db.guidance)), static_argnums=4,
                      out_shardings=replicated(mesh),
                      compiler_options=loop.compiler_options(c, mesh.devices.flat[0].platform))
        res = self.stages()[0].resolution
        side = res // _latent_factor(c)
        root = jax.random.PRNGKey(int(c.train.seed) + 1)

        def sample(indices, ids):
            keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(indices))
            return run(unet, aux, keys, jnp.asarray(ids), (side, side, c.unet.in_channels))

        made = dreambooth.generate_class_images(folder, int(db.num_class_images), prompt_tokenizer(c)([db.class_prompt])[0],
                                                sample, int(db.sample_batch))
        logging.info("dreambooth: generated %d class images of %r into %s", made, db.class_prompt, folder)

    def preview(self, state, aux, batch):
        t, c = self.config.train, self.config
        if self._preview is None:
            from ldm_jax.train.sharding import replicated

            self._preview = jax.jit(make_sampler(c, self.models, int(t.preview_steps), float(t.preview_guidance)),
                                    static_argnums=4, out_shardings=replicated(batch["input_ids"].sharding.mesh))
        kind = next(k for k in ("latents", "moments", "image") if k in batch)
        shape = batch[kind].shape[1:]
        if kind != "latents":
            f = _latent_factor(c) if kind == "image" else 1
            shape = (shape[0] // f, shape[1] // f, c.unet.in_channels)
        n = min(int(t.preview_count), batch[kind].shape[0])
        images = self._preview(state.ema_params, aux, jax.random.PRNGKey(int(t.seed)), batch["input_ids"][:n],
                               tuple(shape))
        return {"samples/ema": image_grid(np.asarray(jax.device_get(images)))}


# ----------------------------------------------------------------------------------------------
# Entry points


def setup(config, mesh: Mesh, models: DiffusionModels | None = None, frozen: dict | None = None) -> loop.Setup:
    """The sharded initial state (seed ``config.train.seed``), the frozen aux and the jitted step on
    ``mesh`` (:func:`ldm_jax.train.loop.setup`); compiled once per process for a configuration."""
    return loop.setup(DiffusionTask(config, models=models, frozen=frozen), mesh)


def abstract_train_state(config, mesh: Mesh, models: DiffusionModels | None = None) -> TrainState:
    """The :class:`TrainState` of :func:`setup` as ``ShapeDtypeStruct`` leaves with their shardings on
    ``mesh`` (e.g. to restore a checkpoint onto another mesh), without creating anything."""
    return loop.abstract_state(DiffusionTask(config, models=models), mesh)


def train(config, workdir: str, *, frozen: dict | None = None, models: DiffusionModels | None = None,
          batch_source_fn: Callable[[Any, Stage, tuple[int, int]], Iterator] | None = None,
          devices=None) -> tuple[TrainState, list[dict]]:
    """Train the diffusion UNet through ``config.stages`` with the one training loop; resumes from
    ``workdir``. The workdir becomes a model source (``load_model(workdir)``,
    ``StableDiffusionPipeline.from_pretrained(workdir)``): :mod:`ldm_jax.train.workdir`.

    See :class:`DiffusionTask` for ``frozen``, ``models``, ``batch_source_fn``; ``devices``: the
    mesh's devices (default all). Returns the final state and the metrics history.
    """
    return loop.train(DiffusionTask(config, frozen=frozen, models=models, batch_source_fn=batch_source_fn),
                      workdir, devices=devices)

Task = DiffusionTask
