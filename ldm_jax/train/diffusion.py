"""Latent diffusion training: pure sharded train step, progressive stages, exact resume.

One step (:func:`make_train_step`), all randomness from ``fold_in(state.rng, state.step)``:

  x0      = vae.encode(image).sample() * scaling_factor    (or precomputed ``batch["latents"]``;
            cached posterior ``batch["moments"]`` of ``ldm-jax encode-dataset``: a fresh sample)
  ids     = input_ids with each row replaced by the empty prompt with prob. ``text_dropout``
  context = text_encoder(ids).context                        (frozen; or cached ``batch["context"]``
            with the dropped rows replaced by the empty prompt's)
  t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
  loss    = mean_b w_b * mean_{hwc} (unet(x_t, t, context) - target)^2,  target eps or v,
            w_b = 1 or min-SNR (min(snr, gamma) / snr for eps, / (snr + 1) for v)
  AdamW (warm-up, global-norm clip) on the UNet; EMA min(decay, (1+n)/(10+n)); a non-finite
  loss or gradient leaves params/optimizer/EMA untouched and counts the step as skipped.

The same random numbers are drawn for the global batch whatever the mesh
(``jax_threefry_partitionable``), so sharded and single-device runs agree to float rounding, and
a run stopped at step N and resumed (state + data position from the checkpoint) is bit-identical
to an uninterrupted one. Entry point: :func:`train`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ldm_jax import xla_cpu
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import optim, sharding
from ldm_jax.train.writers import MetricsLog, MetricWriter, image_grid

__all__ = [
    "TrainState",
    "DiffusionModels",
    "Stage",
    "build_models",
    "alphas_cumprod",
    "empty_prompt_ids",
    "text_dropout",
    "encode_conditioning",
    "make_optimizer",
    "make_train_step",
    "create_train_state",
    "TrainSetup",
    "setup",
    "abstract_train_state",
    "compiler_options",
    "make_sampler",
    "get_stages",
    "stage_index",
    "make_batch_source",
    "train",
]

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (the frozen encoders' params live elsewhere)."""

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


@dataclasses.dataclass(frozen=True)
class Stage:
    """A progressive-resolution stage: ``steps`` steps on ``resolution``-pixel images."""

    resolution: int
    steps: int
    batch_size: int


# ----------------------------------------------------------------------------------------------
# Pieces


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_models(config) -> DiffusionModels:
    """UNet (trainable, ``config.train.compute_dtype``, ``remat``), frozen CLIP text encoder and VAE.

    The VAE is skipped when ``config.data.source`` yields precomputed latents.
    """
    from ldm_jax.models.clip_text import CLIPTextModel
    from ldm_jax.models.unet import UNet2DConditionModel

    t = config.train
    dtype = _DTYPES[t.get("compute_dtype", "float32")]
    unet = UNet2DConditionModel(**dict(config.unet), dtype=dtype, remat=bool(t.get("remat", False)))
    text = CLIPTextModel(**dict(config.text_encoder), dtype=dtype)
    vae = None
    if not _uses_latents(config):
        from ldm_jax.models.autoencoder import AutoencoderKL

        vae = AutoencoderKL(**dict(config.vae), dtype=dtype)
    return DiffusionModels(unet, text, vae)


def _uses_latents(config) -> bool:
    return config.data.get("source", "synthetic") in ("synthetic_latents", "latents")


def alphas_cumprod(num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                   beta_start: float = 0.00085, beta_end: float = 0.012, **_) -> np.ndarray:
    """``abar_t`` for t = 0..T-1 (float64 numpy), as diffusers' DDPM scheduler computes it."""
    if beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif beta_schedule == "squaredcos_cap_v2":
        f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        s = np.arange(num_train_timesteps, dtype=np.float64)
        betas = np.minimum(1 - f((s + 1) / num_train_timesteps) / f(s / num_train_timesteps), 0.999)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}")
    return np.cumprod(1.0 - betas)


def empty_prompt_ids(config) -> np.ndarray:
    """Token ids ``[77]`` of the empty prompt ``""`` (``[BOS, EOS, pad, ...]``).

    From ``config.train.empty_prompt_ids`` if set, else the tokenizer ``config.tokenizer``, else
    CLIP's layout from the vocabulary (BOS = vocab-2, EOS = pad = vocab-1).
    """
    explicit = config.train.get("empty_prompt_ids")
    if explicit is not None:
        return np.asarray(explicit, np.int32)
    length = config.text_encoder.get("max_position_embeddings", 77)
    if config.get("tokenizer"):
        from ldm_jax.models.tokenizer import PromptTokenizer

        tok = PromptTokenizer.from_pretrained(config.tokenizer)
        return np.asarray(tok([""]), np.int32).reshape(-1)[:length]
    vocab = config.text_encoder.vocab_size
    ids = np.full((length,), vocab - 1, np.int32)
    ids[0] = vocab - 2
    return ids


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


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW + warm-up (+ cosine decay over ``train.decay_steps`` updates when set) + clipping from
    ``config.train`` and its learning-rate schedule."""
    t = config.train
    warmup, decay = t.get("warmup_steps", 0), t.get("decay_steps", 0)
    tx = optim.make_optimizer(t.lr, warmup, b1=t.get("b1", 0.9), b2=t.get("b2", 0.999),
                              eps=t.get("adam_eps", 1e-8), weight_decay=t.get("weight_decay", 1e-2),
                              grad_clip_norm=t.get("grad_clip_norm", 1.0), decay_steps=decay)
    return tx, optim.learning_rate_schedule(t.lr, warmup, decay)


def get_stages(config) -> list[Stage]:
    """``config.stages`` (list of dicts with ``resolution``, ``steps``, ``batch_size``)."""
    stages = [Stage(int(s["resolution"]), int(s["steps"]), int(s["batch_size"])) for s in config.stages]
    if not stages or any(s.steps <= 0 or s.batch_size <= 0 or s.resolution <= 0 for s in stages):
        raise ValueError(f"config.stages needs >= 1 stage with positive resolution/steps/batch_size: {stages}")
    return stages


def stage_index(stages: Sequence[Stage], step: int | Array) -> int | Array:
    """Index of the stage that step ``step`` (0-based) belongs to (the last one past the end)."""
    bounds = np.cumsum([s.steps for s in stages])[:-1]
    if isinstance(step, (int, np.integer)):
        return int(np.searchsorted(bounds, step, side="right"))
    return jnp.searchsorted(jnp.asarray(bounds, jnp.int32), step, side="right").astype(jnp.int32)


def _latent_factor(config) -> int:
    return 2 ** (len(config.vae.block_out_channels) - 1)


def make_train_step(config, models: DiffusionModels, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable:
    """Pure ``train_step(state, batch, frozen) -> (state, metrics)``.

    ``batch``: ``image [B,H,W,3]`` in [-1, 1] (or ``latents [B,h,w,C]``, or cached VAE ``moments
    [B,h,w,2C]``) and ``input_ids [B,77]`` (or cached text-encoder ``context [B,77,D]``).
    ``frozen``: ``{"text": params, "vae": params or None, "empty_ids": int32 [77]}``.
    ``metrics``: scalars ``loss, grad_norm, lr, ema_decay, skipped, skipped_steps, text_dropped``.
    """
    t = config.train
    abar = jnp.asarray(alphas_cumprod(**dict(config.scheduler)), jnp.float32)
    num_t = abar.shape[0]
    prediction = t.get("prediction_type") or config.scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction!r}")
    gamma = t.get("min_snr_gamma")
    accum = int(t.get("grad_accum_steps", 1))
    rate = float(t.get("text_dropout", 0.1))
    decay, ema_warmup = float(t.get("ema_decay", 0.9999)), bool(t.get("ema_warmup", True))
    stages = get_stages(config)
    unet, text_encoder, vae = models
    scale = float(config.vae.get("scaling_factor", 0.18215))

    def loss_fn(params, x_t, timesteps, context, target, weights):
        pred = unet.apply({"params": params}, x_t, timesteps, context).astype(jnp.float32)
        per_example = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
        return jnp.mean(weights * per_example)

    def train_step(state: TrainState, batch: Mapping[str, Array], frozen: Mapping[str, Any]):
        key = jax.random.fold_in(state.rng, state.step)
        k_drop, k_post, k_t, k_eps = jax.random.split(key, 4)
        if "latents" in batch:
            x0 = batch["latents"].astype(jnp.float32)
        elif "moments" in batch:  # cached posterior (encode-dataset): the same draw as from "image"
            from ldm_jax.models.autoencoder import DiagonalGaussian

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
        else:
            context, dropped = encode_conditioning(text_encoder, frozen["text"], k_drop, batch["input_ids"],
                                                   frozen["empty_ids"], rate)
        timesteps = jax.random.randint(k_t, (b,), 0, num_t)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        a = abar[timesteps][:, None, None, None]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
        target = eps if prediction == "epsilon" else jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0
        if gamma:
            snr = abar[timesteps] / (1.0 - abar[timesteps])
            weights = jnp.minimum(snr, gamma) / (snr if prediction == "epsilon" else snr + 1.0)
        else:
            weights = jnp.ones((b,), jnp.float32)

        inputs = (x_t, timesteps, context.astype(unet.dtype), target, weights)
        if accum == 1:
            loss, grads = jax.value_and_grad(loss_fn)(state.params, *inputs)
        else:
            if b % accum:
                raise ValueError(f"batch {b} is not divisible by grad_accum_steps {accum}")
            # Row i*accum + a goes to micro-batch a: each device keeps its rows (no resharding).
            micro = jax.tree.map(lambda x: x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1), inputs)

            def body(carry, mb):
                l, g = jax.value_and_grad(loss_fn)(state.params, *mb)
                return jax.tree.map(jnp.add, carry, (l, g)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zeros, micro)
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


def create_train_state(config, models: DiffusionModels, key: Array, latent_shape: tuple[int, ...],
                       tx: optax.GradientTransformation, image_shape: tuple[int, ...] | None = None
                       ) -> tuple[TrainState, dict]:
    """Fresh ``(state, frozen)``: random UNet (EMA = copy), random frozen encoders, empty-prompt ids.

    Pretrained frozen encoders replace ``frozen["text"]`` / ``frozen["vae"]`` (see :func:`train`).
    Jit it with ``out_shardings`` to create the params directly sharded.
    """
    k_unet, k_text, k_vae, k_rng = jax.random.split(key, 4)
    unet, text_encoder, vae = models
    b = latent_shape[0]
    ctx_dim = config.text_encoder.hidden_size
    ids = jnp.zeros((b, config.text_encoder.get("max_position_embeddings", 77)), jnp.int32)
    params = unet.init(k_unet, jnp.zeros(latent_shape, jnp.float32), jnp.zeros((b,), jnp.int32),
                       jnp.zeros((b, ids.shape[1], ctx_dim), jnp.float32))["params"]
    frozen = {"text": text_encoder.init(k_text, ids)["params"],
              # encoder and decoder (the decoder renders the sample grids)
              "vae": None if vae is None else vae.init(k_vae, jnp.zeros(image_shape, jnp.float32))["params"],
              "empty_ids": jnp.asarray(empty_prompt_ids(config))}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                       rng=k_rng, stage=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))
    return state, frozen


def make_sampler(config, models: DiffusionModels, num_steps: int = 20, guidance_scale: float = 5.0) -> Callable:
    """``sample(ema_params, frozen, key, input_ids [N,77], latent_shape) -> images [N,H,W,3]`` in [-1, 1].

    Deterministic DDIM (eta 0) with classifier-free guidance (empty prompt as the negative), for
    the sample grids logged during training; decodes with the VAE (latent channels 0..2 without one).
    """
    abar = jnp.asarray(alphas_cumprod(**dict(config.scheduler)), jnp.float32)
    num_t = abar.shape[0]
    offset = int(config.scheduler.get("steps_offset", 0))
    ts = np.clip(np.arange(0, num_t, num_t // num_steps) + offset, 0, num_t - 1)[::-1]
    prev = np.concatenate([ts[1:], [-1]])
    v_pred = (config.train.get("prediction_type") or config.scheduler.get("prediction_type")) == "v_prediction"
    unet, text_encoder, vae = models
    scale = float(config.vae.get("scaling_factor", 0.18215))

    def sample(ema_params, frozen, key, input_ids, latent_shape):
        n = input_ids.shape[0]
        # one (cond, uncond) context pair per sample: the UNet runs its first layers once per sample
        ids = jnp.stack([input_ids, jnp.broadcast_to(frozen["empty_ids"], input_ids.shape)], axis=1)
        context = text_encoder.apply({"params": frozen["text"]}, ids.reshape(2 * n, -1)).context
        x = jax.random.normal(key, (n,) + tuple(latent_shape), jnp.float32)

        def body(x, tp):
            t, t_prev = tp
            out = unet.apply({"params": ema_params}, x, jnp.full((n,), t), context).astype(jnp.float32)
            cond, uncond = out[0::2], out[1::2]
            out = uncond + guidance_scale * (cond - uncond)
            a, a_prev = abar[t], jnp.where(t_prev >= 0, abar[jnp.maximum(t_prev, 0)], abar[0])
            if v_pred:
                x0, eps = jnp.sqrt(a) * x - jnp.sqrt(1 - a) * out, jnp.sqrt(1 - a) * x + jnp.sqrt(a) * out
            else:
                x0, eps = (x - jnp.sqrt(1 - a) * out) / jnp.sqrt(a), out
            return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps, None

        x, _ = jax.lax.scan(body, x, (jnp.asarray(ts), jnp.asarray(prev)))
        if vae is None:
            return jnp.clip(x[..., :3], -1, 1)
        return jnp.clip(vae.apply({"params": frozen["vae"]}, x / scale, method="decode"), -1, 1)

    return sample


# ----------------------------------------------------------------------------------------------
# Set-up on a mesh


@dataclasses.dataclass
class TrainSetup:
    """A state and its shardings on ``mesh`` plus the jitted step (donates the state)."""

    mesh: Mesh
    models: DiffusionModels
    state: TrainState
    frozen: dict
    state_shardings: Any
    frozen_shardings: Any
    step_fn: Callable  # (state, batch, frozen) -> (state, metrics)
    schedule: optax.Schedule


def _state_shardings(abstract: TrainState, mesh: Mesh, config) -> Any:
    s = config.get("sharding", {}) or {}
    rules, min_size = tuple(s.get("rules", ())), int(s.get("min_size", 2 ** 14))
    rep = sharding.replicated(mesh)
    return abstract.replace(
        step=rep, rng=rep, stage=rep, skipped_steps=rep,
        params=sharding.param_shardings(abstract.params, mesh, rules, min_size),
        ema_params=sharding.param_shardings(abstract.ema_params, mesh, rules, min_size),
        opt_state=sharding.param_shardings(abstract.opt_state, mesh, rules, min_size))


# Jitted init and step per (config, mesh, models): another setup()/train() in the same process (a
# resumed run, a restart after preemption, tests) reuses the traced and compiled programs instead of
# building them again. Settings that only steer the loop (logging, checkpoints, samples) are not
# part of the key.
_LOOP_ONLY_TRAIN_KEYS = frozenset({
    "progress", "tensorboard", "log_every", "checkpoint_every", "keep_checkpoints", "keep_every",
    "async_checkpoints", "sample_every", "sample_steps", "sample_guidance", "sample_count",
    "compilation_cache_dir"})
_SETUP_CACHE_SIZE = 8
_setup_cache: "dict[Any, _CompiledSetup]" = {}  # insertion order = least recently used first


@dataclasses.dataclass(frozen=True)
class _CompiledSetup:
    models: DiffusionModels
    schedule: optax.Schedule
    key: Array
    abstract_state: TrainState  # ShapeDtypeStructs carrying state_shardings
    state_shardings: Any
    frozen_shardings: Any
    init_fn: Callable  # key -> (state, random frozen), jitted with out_shardings
    step_fn: Callable


def compiler_options(config, backend: str | None = None) -> dict | None:
    """XLA options for the jitted init/step (:func:`ldm_jax.xla_cpu.train_compiler_options` of
    ``config.train``: ``ynn_fusions`` joined with ``compiler_options``). ``backend``: the mesh's
    platform (default: JAX's default backend)."""
    return xla_cpu.train_compiler_options(config.train, backend)


def _setup_key(config, mesh: Mesh, models: DiffusionModels | None):
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    cfg = {k: v for k, v in cfg.items() if k not in ("name", "distributed")}
    cfg["train"] = {k: v for k, v in dict(cfg.get("train", {})).items() if k not in _LOOP_ONLY_TRAIN_KEYS}
    default = lambda o: o.tolist() if isinstance(o, (np.ndarray, np.generic)) else repr(o)  # noqa: E731
    key = (json.dumps(cfg, sort_keys=True, default=default), mesh, models)
    try:
        hash(key)
    except TypeError:  # e.g. models with unhashable fields: no reuse
        return None
    return key


def _compiled_setup(config, mesh: Mesh, models: DiffusionModels | None) -> _CompiledSetup:
    key = _setup_key(config, mesh, models)
    hit = _setup_cache.pop(key, None) if key is not None else None
    if hit is None:
        hit = _build_setup(config, mesh, models)
    if key is not None:
        _setup_cache[key] = hit  # most recently used last
        while len(_setup_cache) > _SETUP_CACHE_SIZE:
            _setup_cache.pop(next(iter(_setup_cache)))
    return hit


def _build_setup(config, mesh: Mesh, models: DiffusionModels | None) -> _CompiledSetup:
    models = models or build_models(config)
    tx, schedule = make_optimizer(config)
    stage0 = get_stages(config)[0]
    f = _latent_factor(config)
    if _uses_latents(config):
        latent_shape = (1, stage0.resolution, stage0.resolution, config.unet.in_channels)
    else:
        latent_shape = (1, stage0.resolution // f, stage0.resolution // f, config.unet.in_channels)
    image_shape = (1, stage0.resolution, stage0.resolution, config.vae.in_channels)
    init = lambda k: create_train_state(config, models, k, latent_shape, tx, image_shape)  # noqa: E731
    key = jax.random.PRNGKey(int(config.train.get("seed", 0)))
    abstract_state, abstract_frozen = jax.eval_shape(init, key)
    state_sh = _state_shardings(abstract_state, mesh, config)
    s = config.get("sharding", {}) or {}
    frozen_sh = sharding.param_shardings(abstract_frozen, mesh, tuple(s.get("rules", ())),
                                         int(s.get("min_size", 2 ** 14)))
    opts = compiler_options(config, backend=mesh.devices.flat[0].platform)
    init_fn = jax.jit(init, out_shardings=(state_sh, frozen_sh), compiler_options=opts)
    step_fn = jax.jit(make_train_step(config, models, tx, schedule), donate_argnums=0,
                      in_shardings=(state_sh, sharding.batch_sharding(mesh), frozen_sh),
                      out_shardings=(state_sh, sharding.replicated(mesh)), compiler_options=opts)
    return _CompiledSetup(models, schedule, key, ckpt_lib.abstract_like(abstract_state, state_sh), state_sh,
                          frozen_sh, init_fn, step_fn)


def abstract_train_state(config, mesh: Mesh, models: DiffusionModels | None = None) -> TrainState:
    """The :class:`TrainState` of :func:`setup` as ``ShapeDtypeStruct`` leaves with their shardings on
    ``mesh`` (e.g. to restore a checkpoint onto another mesh), without creating or compiling anything."""
    return _compiled_setup(config, mesh, models).abstract_state


def setup(config, mesh: Mesh, models: DiffusionModels | None = None, frozen: dict | None = None) -> TrainSetup:
    """Build models, the sharded initial state (seed ``config.train.seed``) and the jitted step.

    ``frozen``: pretrained ``{"text": ..., "vae": ...}`` params (replacing the random ones).
    The jitted init and step are reused by later calls with the same config (loop-only
    ``config.train`` settings aside), mesh and models, so they compile once per process.
    """
    c = _compiled_setup(config, mesh, models)
    state, random_frozen = c.init_fn(c.key)
    if frozen is not None:
        merged = dict(random_frozen)
        merged.update({k: v for k, v in frozen.items() if v is not None})
        random_frozen = jax.device_put(merged, c.frozen_shardings)
    return TrainSetup(mesh, c.models, state, random_frozen, c.state_shardings, c.frozen_shardings, c.step_fn,
                      c.schedule)


# ----------------------------------------------------------------------------------------------
# Data


def make_batch_source(config, stage: Stage, rows: tuple[int, int]) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows ``[start, stop)`` of each global batch of ``stage``.

    ``config.data.cached_latents``: a directory of ``ldm-jax encode-dataset`` (VAE moments and text
    context, so the frozen encoders do not run; it must have been encoded at ``stage.resolution``).
    Else ``config.data.source``: ``synthetic`` (images) or ``synthetic_latents`` (precomputed-latent
    stand-in), see :class:`ldm_jax.train.synthetic.SyntheticCaptions`. Iterators must have
    ``get_state()``/``set_state()``.
    """
    from ldm_jax.train.synthetic import SyntheticCaptions

    d = config.data
    if d.get("cached_latents"):
        from ldm_jax.data.latents import CachedLatentsSource, make_latents_iterator

        cached = CachedLatentsSource(d.cached_latents)
        if int(cached.metadata["image_size"]) != stage.resolution:
            raise ValueError(f"data.cached_latents {d.cached_latents!r} was encoded at {cached.metadata['image_size']} "
                             f"px; this stage trains at {stage.resolution} px")
        if rows[1] - rows[0] != stage.batch_size // jax.process_count():
            raise ValueError(f"rows {rows}: cached latents need each process to feed an equal share of the batch")
        keys = [k for k in ("moments", "context", "input_ids") if k in cached.metadata["features"]]
        return make_latents_iterator(cached, global_batch_size=stage.batch_size, seed=int(d.get("seed", 0)),
                                     keys=keys, num_threads=int(d.get("num_threads", 2)))
    source = d.get("source", "synthetic")
    if source in ("synthetic", "synthetic_latents"):
        latents = source == "synthetic_latents"
        return SyntheticCaptions(stage.resolution, stage.batch_size, rows, seed=int(d.get("seed", 0)),
                                 num_examples=int(d.get("num_examples", 256)),
                                 num_classes=int(d.get("num_classes", 8)),
                                 vocab_size=config.text_encoder.vocab_size,
                                 max_length=config.text_encoder.get("max_position_embeddings", 77),
                                 latents=latents, latent_channels=config.unet.in_channels)
    raise ValueError(f"data.source {source!r} is not supported by train(); pass batch_source_fn")


# ----------------------------------------------------------------------------------------------
# Loop


def train(config, workdir: str, *, frozen: dict | None = None, models: DiffusionModels | None = None,
          batch_source_fn: Callable[[Any, Stage, tuple[int, int]], Iterator] | None = None,
          devices: Sequence[jax.Device] | None = None) -> tuple[TrainState, list[dict]]:
    """Train the diffusion UNet through ``config.stages``; resumes from ``workdir/checkpoints``.

    Multi-host: set ``config.distributed`` (see :func:`ldm_jax.train.sharding.maybe_initialize_distributed`);
    each process feeds its rows of the global batch. SIGTERM saves a checkpoint and returns.
    Logs TensorBoard scalars to ``workdir/tensorboard`` and shows a progress bar. Writes
    ``workdir/config.json``, the frozen encoders (``workdir/frozen/``) and the tokenizer so that
    ``load_model(workdir)`` / ``StableDiffusionPipeline.from_pretrained(workdir)`` sample from the
    checkpoints (:mod:`ldm_jax.convert.workdir`).

    Args:
      frozen: pretrained frozen ``{"text": params, "vae": params}``; random when omitted (tests).
      models: prebuilt :class:`DiffusionModels` (default :func:`build_models`).
      batch_source_fn: ``(config, stage, rows) -> iterator`` (default :func:`make_batch_source`).
      devices: devices of the mesh (default all).
    Returns: the final state and the metrics history (one dict per step; TensorBoard and the progress bar get
    them every ``config.train.log_every`` steps).
    """
    from tqdm.auto import tqdm

    sharding.maybe_initialize_distributed(config.get("distributed"))
    t = config.train
    if t.get("compilation_cache_dir"):  # restarts (preemption, resume) reuse compiled programs
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(t.compilation_cache_dir))
    mesh = sharding.make_mesh(dict(config.get("mesh", {"data": -1})), devices)
    stages = get_stages(config)
    total = sum(s.steps for s in stages)
    if frozen is None:
        logging.warning("no pretrained frozen encoders given: text encoder/VAE are random (tests only)")
    ts = setup(config, mesh, models, frozen)
    # config.json, frozen encoders, tokenizer: the workdir becomes a model source (load_model(workdir))
    from ldm_jax.convert.workdir import write_workdir_model

    write_workdir_model(workdir, config, ts.frozen)
    state = ts.state
    ckpt = ckpt_lib.CheckpointManager(
        os.path.join(workdir, "checkpoints"), save_every=int(t.get("checkpoint_every", 1000)),
        keep_last=int(t.get("keep_checkpoints", 3)), keep_every=t.get("keep_every") or None,
        async_save=bool(t.get("async_checkpoints", True)))
    meta: dict = {}
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(ckpt_lib.abstract_like(state, ts.state_shardings))
        logging.info("resumed from step %d (stage %d)", int(state.step), int(meta.get("stage", 0)))
    step = int(state.step)
    data_states: dict = dict(meta.get("data", {}))

    writer = MetricWriter(os.path.join(workdir, "tensorboard") if t.get("tensorboard", True) else None)
    bar = tqdm(total=total, initial=step, desc="diffusion", dynamic_ncols=True,
               disable=not t.get("progress", True) or jax.process_index() != 0)
    log_every = int(t.get("log_every", 50))
    sample_every = int(t.get("sample_every", 0) or 0)
    if sample_every:
        sampler = jax.jit(make_sampler(config, ts.models, int(t.get("sample_steps", 20)),
                                       float(t.get("sample_guidance", 5.0))), static_argnums=4,
                          out_shardings=sharding.replicated(mesh))
    current, source = None, None
    metrics_log = MetricsLog()
    try:
        with ckpt_lib.PreemptionGuard() as guard:
            while step < total:
                idx = stage_index(stages, step)
                if idx != current:  # new stage (or start): new data shape, recompiles once
                    stage = stages[idx]
                    rows = sharding.local_batch_rows(mesh, stage.batch_size)
                    source = (batch_source_fn or make_batch_source)(config, stage, rows)
                    saved = data_states.get(str(idx))
                    if saved is not None:
                        source.set_state(saved[jax.process_index()])
                    current = idx
                    logging.info("stage %d: %d px, batch %d, steps %d..%d", idx, stage.resolution,
                                 stage.batch_size, step, sum(s.steps for s in stages[:idx + 1]))
                batch = sharding.make_global_batch(mesh, next(source), stages[idx].batch_size)
                state, metrics = ts.step_fn(state, batch, ts.frozen)
                step += 1
                metrics_log.add(step, metrics, stages[idx].batch_size)
                bar.update(1)
                if step % log_every == 0 or step == total:
                    m = metrics_log.flush()
                    m["stage"] = idx
                    writer.scalars(step, {k: v for k, v in m.items() if k != "step"})
                    bar.set_postfix(loss=f"{m['loss']:.4f}", stage=idx, img_s=f"{m['images_per_s']:.1f}")
                if sample_every and step % sample_every == 0:
                    kind = next(k for k in ("latents", "moments", "image") if k in batch)
                    shape = batch[kind].shape[1:]
                    if kind != "latents":
                        f = _latent_factor(config) if kind == "image" else 1
                        shape = (shape[0] // f, shape[1] // f, config.unet.in_channels)
                    n = min(int(t.get("sample_count", 8)), stages[idx].batch_size)
                    images = sampler(state.ema_params, ts.frozen, jax.random.PRNGKey(int(t.get("seed", 0))),
                                     batch["input_ids"][:n], tuple(shape))
                    writer.image(step, "samples/ema", image_grid(np.asarray(
                        jax.device_get(images))))

                def checkpoint_meta():  # gathers every process's data position: a collective
                    data_states[str(idx)] = ckpt_lib.allgather_json(source.get_state())
                    return {"stage": idx, "step": step, "data": data_states}

                if ckpt.save_or_stop(guard, step, state, checkpoint_meta, last=step == total):
                    break
    finally:
        history = metrics_log.close()
        bar.close()
        ckpt.close()
        writer.close()
    return state, history
