"""Autoencoder training (LDM first stage): L1 + LPIPS + PatchGAN with an adaptive weight, KL or VQ.

The loss is LDM's ``LPIPSWithDiscriminator`` (KL models) / taming's ``VQLPIPSWithDiscriminator``:

  rec   = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)                      (per pixel)
          (+ edge_weight * the same pixel loss of the finite-difference error: :func:`edge_loss`)
  se    = sum(pixel + edge loss of pool2(x) - decode(pool2(z))) / B   (``scale_equivariance_weight``)
  nll   = sum(rec / exp(logvar) + logvar) / B        (KL; ``vq``: mean(rec), no logvar)
  g     = -mean D(x_rec)
  d_w   = clip(||dnll/dL|| / (||dg/dL|| + 1e-4), 0, 1e4) * disc_weight      (L: decoder's last conv)
  loss  = nll + kl_weight * KL  (or + codebook_weight * codebook_loss)  + se_weight * se
          + d_w * disc_factor * g
  d_loss = disc_factor * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))    (hinge)

with ``disc_factor = 0`` for ``step < disc_start``. ``se`` is the scale-equivariance term of
Skorokhodov et al. 2025 ("Improving the Diffusability of Autoencoders"): the decoder must turn the
2x2-average-pooled latents into the 2x2-average-pooled image, which keeps high frequencies out of the
latents that the image does not have (KL autoencoders only; off at weight 0, LDM's recipe). One
jitted :func:`train_step` updates the generator (autoencoder) with one Adam, then the discriminator with another (betas 0.5, 0.9).

Notes on fidelity to the PyTorch recipe:
- the discriminator step reuses this step's (pre-update) reconstruction instead of running the
  autoencoder again (Lightning re-runs the forward with the updated weights): one forward saved;
- before ``disc_start`` the discriminator is not run at all (its params, BatchNorm statistics
  and optimizer state stay untouched; in PyTorch its zero-gradient Adam steps are no-ops too);
- LDM's optimizer does not include ``logvar`` (it stays at its init, 0); ``learn_logvar=True``
  trains it, as later Stability code does.
- the dL gradients of the adaptive weight come from the same vjp as the update (no second
  forward pass); under jit only the last conv's transpose is computed for them.

:class:`AutoencoderTask` trains ``AutoencoderKL`` (``loss.kind='kl'``) or ``VQModel`` (``'vq'``)
built from ``config.vae`` in the one training loop (:mod:`ldm_jax.train.loop`: sharding,
checkpoints with the data position, exact resume, SIGTERM, TensorBoard scalars and
reconstructions, progress bar) on batches of ``config.data`` (:func:`ldm_jax.data.make_batches`:
shapes_captions, an image folder, webdataset shards, tfds or the synthetic set). Entry point:
:func:`train_autoencoder` (or ``ldm-jax train --config sd_autoencoder``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh

from ldm_jax.convert.lpips import load_lpips_params
from ldm_jax.data.batches import make_batches
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import LPIPS
from ldm_jax.train import loop, optim
from ldm_jax.train.loop import Stage
from ldm_jax.train.writers import image_grid

__all__ = [
    "AETrainState",
    "AutoencoderTask",
    "hinge_d_loss",
    "vanilla_d_loss",
    "adaptive_weight",
    "adopt_weight",
    "make_forward",
    "make_scale_equivariant_forward",
    "pool2",
    "noisy_latents",
    "make_optimizers",
    "create_train_state",
    "make_train_step",
    "build_autoencoder",
    "load_lpips",
    "make_data_iterator",
    "setup",
    "train_autoencoder",
]

Array = jax.Array
# (params, images [B,H,W,3], key) -> (reconstruction [B,H,W,3], per-example regulariser [B] or scalar)
ForwardFn = Callable[[Any, Array, Array], tuple[Array, Array]]


@flax.struct.dataclass
class AETrainState:
    """Everything a resumed run needs. ``params = {'ae': ..., 'logvar': scalar}``; the frozen LPIPS
    weights are the step's aux, not state."""

    step: Array
    params: Any
    opt_state: Any
    disc_params: Any
    disc_batch_stats: Any
    disc_opt_state: Any
    rng: Array  # raw uint32 key; step key = fold_in(rng, step)


# ----------------------------------------------------------------------------------------------
# Loss pieces


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """0.5 * (mean relu(1 - real) + mean relu(1 + fake)); any shapes -> scalar."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """0.5 * (mean softplus(-real) + mean softplus(fake)); any shapes -> scalar."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def edge_loss(x: Array, rec: Array, pixel_loss: Callable[[Array], Array] = jnp.square) -> Array:
    """Per-pixel ``pixel_loss`` of the difference between the images' horizontal and vertical finite
    differences ([B,H,W,C], zero on the last row/column): large where an edge is missing or misplaced.
    A from-scratch autoencoder on small objects (the CPU demo) reconstructs the flat background and
    the colour long before the outline; this term weighs the outline directly."""
    def dx(a):
        return jnp.pad(a[:, :, 1:] - a[:, :, :-1], ((0, 0), (0, 0), (0, 1), (0, 0))).astype(jnp.float32)

    def dy(a):
        return jnp.pad(a[:, 1:] - a[:, :-1], ((0, 0), (0, 1), (0, 0), (0, 0))).astype(jnp.float32)

    err = x - rec  # differences are linear: dx(x) - dx(rec) == dx(x - rec)
    return pixel_loss(dx(err)) + pixel_loss(dy(err))


def adopt_weight(weight: float, step: Array, threshold: int, value: float = 0.0) -> Array:
    """``weight`` once ``step >= threshold``, else ``value`` (taming's ``adopt_weight``)."""
    return jnp.where(step >= threshold, weight, value)


def adaptive_weight(nll_grad: Any, g_grad: Any, disc_weight: float) -> Array:
    """clip(||nll_grad|| / (||g_grad|| + 1e-4), 0, 1e4) * disc_weight, gradient stopped."""
    w = optax.tree.norm(nll_grad) / (optax.tree.norm(g_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)


# ----------------------------------------------------------------------------------------------
# Model adapters


def make_forward(model: nn.Module, kind: str = "kl", latent_noise: float = 0.0) -> ForwardFn:
    """Adapter ``(params, x, key) -> (reconstruction, regulariser)`` for the loss.

    ``kind='kl'``: ``AutoencoderKL``-like (``encode`` -> posterior, ``decode``): decodes the posterior
    sample ``z``, as ``model.apply(p, x, key=key, sample_posterior=True)`` does; regulariser
    ``posterior.kl()`` [B]. With ``latent_noise`` > 0 the decoder reads ``z + t * std(z) * n`` instead
    (``n`` standard normal, ``t ~ U(0, latent_noise)`` per example, ``std(z)`` over the batch, gradient
    stopped): see :func:`noisy_latents`.
    ``kind='vq'``: ``model.apply(p, x)`` -> ``(rec, codebook_loss, ...)`` or ``(rec, info)`` with
    ``info['loss']``/``info['codebook_loss']``; regulariser the codebook loss.
    """
    latent_noise = float(latent_noise)
    if latent_noise < 0:
        raise ValueError(f"loss.latent_noise must be >= 0, got {latent_noise}")
    if latent_noise > 0 and kind != "kl":
        raise ValueError(f"loss.latent_noise > 0 needs loss.kind='kl', got {kind!r}")
    if kind == "kl":

        def forward(params, x, key):
            posterior, _, z = _encode(model, params, x, key, latent_noise)
            return model.apply({"params": params}, z, method=model.decode), posterior.kl()

    elif kind == "vq":

        def forward(params, x, key):
            del key
            out = model.apply({"params": params}, x)
            rec, second = out[0], out[1]
            if isinstance(second, Mapping):
                for name in ("codebook_loss", "loss", "commitment_loss"):
                    if name in second:
                        return rec, second[name]
                raise ValueError(f"VQ model output has no codebook loss among {sorted(second)}")
            return rec, second

    else:
        raise ValueError(f"loss kind must be 'kl' or 'vq', got {kind!r}")
    return forward


def noisy_latents(z: Array, key: Array, max_scale: float) -> Array:
    """``z + t * std(z) * n``: ``n`` standard normal, ``t ~ U(0, max_scale)`` per example, ``std(z)`` of
    the whole batch with its gradient stopped (the noise is relative: growing the latents buys nothing).

    Decoding noisy latents is the latent-denoising objective of l-DeTok (Yang et al. 2025, "Latent
    Denoising Makes Good Visual Tokenizers"): what the decoder needs must survive noise, so the encoder
    puts it in large, robust directions of the latent space, which is what the diffusion model
    learns first. Without it a from-scratch autoencoder can carry an object's shape in directions far
    smaller than its colour (the CPU demo: ``latent_shape_split``).
    """
    k_t, k_n = jax.random.split(key)
    t = jax.random.uniform(k_t, (z.shape[0],) + (1,) * (z.ndim - 1), z.dtype, 0.0, max_scale)
    return z + t * jax.lax.stop_gradient(jnp.std(z)) * jax.random.normal(k_n, z.shape, z.dtype)


def pool2(a: Array) -> Array:
    """2x2 average pooling of ``[B, H, W, C]`` (H and W even)."""
    b, h, w, c = a.shape
    if h % 2 or w % 2:
        raise ValueError(f"pool2: spatial size {(h, w)} is not even")
    return a.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))


def _encode(model: nn.Module, params, x: Array, key: Array, latent_noise: float):
    """(posterior, its sample z, the latents the decoder reads: z, or :func:`noisy_latents` of z when
    ``latent_noise`` > 0) of a KL autoencoder."""
    posterior = model.apply({"params": params}, x, method=model.encode)
    if latent_noise == 0:
        z = posterior.sample(key)
        return posterior, z, z
    k_post, k_noise = jax.random.split(key)
    z = posterior.sample(k_post)
    return posterior, z, noisy_latents(z, k_noise, latent_noise)


def make_scale_equivariant_forward(model: nn.Module, latent_noise: float = 0.0):
    """``(params, x, key) -> (reconstruction, KL [B], decode(pool2(z)))`` for ``AutoencoderKL``-like
    models (``encode`` -> posterior, ``decode``): the forward of ``loss.scale_equivariance_weight``.
    ``z`` is the posterior sample; the reconstruction decodes it (its noisy version with
    ``latent_noise`` > 0), as in :func:`make_forward`."""

    def forward(params, x, key):
        posterior, z, z_dec = _encode(model, params, x, key, float(latent_noise))
        rec = model.apply({"params": params}, z_dec, method=model.decode)
        small = model.apply({"params": params}, pool2(z), method=model.decode)
        return rec, posterior.kl(), small

    return forward


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set_path(tree, path, value):
    flat = traverse_util.flatten_dict(flax.core.unfreeze(tree))
    if tuple(path) not in flat:
        raise ValueError(f"last-layer path {'/'.join(path)} is not in the autoencoder params")
    flat[tuple(path)] = value
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------
# Optimizers and state


def learning_rate(config) -> float:
    """LDM ``scale_lr``: base_lr * batch * accumulation (batch = global batch over all devices)."""
    o = config.optim
    if not o.scale_lr:
        return float(o.base_learning_rate)
    return float(o.base_learning_rate) * config.train.batch_size * config.train.accumulation


def make_optimizers(config) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """(generator, discriminator) Adams with betas (b1, b2) = (0.5, 0.9) at LDM's constant rate, or a
    cosine decay over ``optim.decay_steps`` updates when set; logvar frozen unless
    ``config.loss.learn_logvar``; the autoencoder's top-level modules named in ``optim.frozen`` frozen
    (``("encoder", "quant_conv")``: a decoder fine-tune, which keeps the latent space as it is)."""
    o = config.optim
    lr = learning_rate(config)
    if o.decay_steps:  # a float rate otherwise, so existing checkpoints keep their optimizer-state layout
        lr = optim.learning_rate_schedule(lr, 0, o.decay_steps)
    adam = lambda: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    frozen = tuple(o.frozen)

    def labels(params):
        unknown = sorted(set(frozen) - set(params["ae"]))
        if unknown:
            raise ValueError(f"optim.frozen names {unknown}, not modules of the autoencoder "
                             f"({', '.join(sorted(params['ae']))})")
        ae = jax.tree_util.tree_map_with_path(
            lambda path, _: "freeze" if getattr(path[0], "key", None) in frozen else "train", params["ae"])
        return {"ae": ae, "logvar": "train" if config.loss.learn_logvar else "freeze"}

    gen = optax.multi_transform({"train": adam(), "freeze": optax.set_to_zero()}, labels)
    return gen, adam()


def build_discriminator(config) -> NLayerDiscriminator:
    lc = config.loss
    return NLayerDiscriminator(input_nc=lc.disc_in_channels, ndf=lc.disc_ndf, n_layers=lc.disc_num_layers)


def create_train_state(config, model: nn.Module, key: Array, image_shape: tuple[int, ...]) -> tuple[AETrainState, dict]:
    """Pure ``(state, aux)``: autoencoder, logvar, discriminator and both optimizers; the aux holds
    the frozen LPIPS network (``{"lpips": params}``: random VGG, replaced by published weights
    through :func:`load_lpips`, or ``{}`` when ``loss.perceptual_weight`` is 0).

    ``image_shape``: one batch's shape [B, H, W, 3]. Jit it (eager init of VGG-sized modules is slow).
    """
    gen_tx, disc_tx = make_optimizers(config)
    disc = build_discriminator(config)
    k_ae, k_d, k_l, k_rng = jax.random.split(key, 4)
    x = jnp.zeros(image_shape, jnp.float32)
    ae_params = model.init(k_ae, x)["params"]
    disc_vars = disc.init(k_d, x, train=False)
    lpips_params = LPIPS().init(k_l, x[:1], x[:1]) if float(config.loss.perceptual_weight) > 0 else {}
    params = {"ae": ae_params, "logvar": jnp.asarray(config.loss.logvar_init, jnp.float32)}
    state = AETrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        opt_state=gen_tx.init(params),
        disc_params=disc_vars["params"],
        disc_batch_stats=disc_vars["batch_stats"],
        disc_opt_state=disc_tx.init(disc_vars["params"]),
        rng=jax.random.key_data(k_rng) if jnp.issubdtype(k_rng.dtype, jax.dtypes.prng_key) else k_rng,
    )
    return state, {"lpips": lpips_params}


# ----------------------------------------------------------------------------------------------
# The step


def make_train_step(config, model: nn.Module, forward: ForwardFn | None = None):
    """Return the pure ``train_step(state, batch, aux) -> (state, metrics)`` (not yet jitted).

    ``batch``: ``{"image": [B, H, W, 3] in [-1, 1]}``; ``aux``: ``{"lpips": frozen LPIPS params}``.
    """
    lc = config.loss
    kind = lc.kind
    custom_forward = forward is not None
    forward = forward or make_forward(model, kind, lc.latent_noise)
    disc = build_discriminator(config)
    lpips = LPIPS()
    gen_tx, disc_tx = make_optimizers(config)
    last_layer = tuple(lc.last_layer)
    pw = float(lc.perceptual_weight)
    pixel_w = float(lc.pixelloss_weight)
    # "l1" is LDM's; "l2" weighs large errors (small objects lost on a flat background) far more,
    # which a short from-scratch run (the CPU demo) needs to keep small shapes.
    pixel_loss = {"l1": jnp.abs, "l2": jnp.square}[lc.pixel_loss]
    edge_w = float(lc.edge_weight)
    reg_w = float(lc.kl_weight if kind == "kl" else lc.codebook_weight)
    se_w = float(lc.scale_equivariance_weight)
    if se_w < 0:
        raise ValueError(f"loss.scale_equivariance_weight must be >= 0, got {se_w}")
    if se_w > 0 and (kind != "kl" or custom_forward):
        raise ValueError("loss.scale_equivariance_weight > 0 needs loss.kind='kl' and the task's own forward "
                         "(it decodes the pooled latents)")
    se_forward = make_scale_equivariant_forward(model, lc.latent_noise) if se_w > 0 else None
    disc_weight = float(lc.disc_weight)
    disc_factor_cfg = float(lc.disc_factor)
    disc_start = int(lc.disc_start)
    d_loss_fn = _D_LOSSES[lc.disc_loss]

    def pixel_rec(x, rec_img):
        """Per-pixel pixel (+ edge) loss: the reconstruction's, and the pooled one of the se term."""
        rec = pixel_w * pixel_loss(x - rec_img)
        if edge_w > 0:
            rec = rec + edge_w * edge_loss(x, rec_img, pixel_loss)
        return rec

    def nll_fn(rec_img, logvar, x, lpips_params):
        rec = pixel_rec(x, rec_img)
        p_loss = jnp.zeros((x.shape[0],), jnp.float32)
        if pw > 0:
            p_loss = lpips.apply(lpips_params, x, rec_img)
            rec = rec + pw * p_loss[:, None, None, None]
        if kind == "kl":
            nll = jnp.sum(rec / jnp.exp(logvar) + logvar) / x.shape[0]
        else:
            nll = jnp.mean(rec)
        return nll, (jnp.mean(rec), jnp.mean(p_loss))

    def disc_apply(params, stats, y):
        logits, new = disc.apply({"params": params, "batch_stats": stats}, y, train=True,
                                 mutable=["batch_stats"])
        return logits, new["batch_stats"]

    def g_fn(rec_img, disc_params, stats):
        logits, new_stats = disc_apply(disc_params, stats, rec_img)
        return -jnp.mean(logits.astype(jnp.float32)), new_stats

    def train_step(state: AETrainState, batch, aux):
        x = batch["image"].astype(jnp.float32)
        key = jax.random.fold_in(state.rng, state.step)
        ae_params, logvar = state.params["ae"], state.params["logvar"]
        kernel = _get_path(ae_params, last_layer)

        def fwd(kernel, ae_params):
            params = _set_path(ae_params, last_layer, kernel)
            if se_forward is None:
                rec_img, reg = forward(params, x, key)
                se = jnp.zeros((), jnp.float32)
            else:
                rec_img, reg, small = se_forward(params, x, key)
                se = jnp.sum(pixel_rec(pool2(x), small.astype(jnp.float32))) / x.shape[0]
            return rec_img.astype(jnp.float32), jnp.sum(reg) / x.shape[0] if jnp.ndim(reg) else reg, se

        (rec_img, reg, se), vjp_fn = jax.vjp(fwd, kernel, ae_params)
        (nll, (rec_mean, p_mean)), (c_nll, c_logvar) = jax.value_and_grad(
            nll_fn, argnums=(0, 1), has_aux=True)(rec_img, logvar, x, aux["lpips"])

        disc_factor = adopt_weight(disc_factor_cfg, state.step, disc_start)
        active = disc_factor > 0

        def with_disc(_):
            (g, new_stats), c_g = jax.value_and_grad(g_fn, has_aux=True)(
                rec_img, state.disc_params, state.disc_batch_stats)
            zero, zero_se = jnp.zeros_like(reg), jnp.zeros_like(se)
            dk_nll = vjp_fn((c_nll, zero, zero_se))[0]
            dk_g = vjp_fn((c_g, zero, zero_se))[0]
            d_w = adaptive_weight(dk_nll, dk_g, disc_weight)
            return g, c_g, d_w, new_stats

        def without_disc(_):
            return (jnp.zeros((), jnp.float32), jnp.zeros_like(rec_img), jnp.zeros((), jnp.float32),
                    state.disc_batch_stats)

        g, c_g, d_w, stats = jax.lax.cond(active, with_disc, without_disc, None)
        coef = d_w * disc_factor
        loss = nll + reg_w * reg + se_w * se + coef * g
        dk, d_ae = vjp_fn((c_nll + coef * c_g, jnp.asarray(reg_w, reg.dtype), jnp.asarray(se_w, se.dtype)))
        grads = {"ae": _set_path(d_ae, last_layer, dk), "logvar": c_logvar}
        updates, opt_state = gen_tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # Discriminator on this step's reconstruction (detached); real and fake in separate
        # BatchNorm calls, as the PyTorch loss does.
        fake = jax.lax.stop_gradient(rec_img)

        def d_objective(dparams, stats):
            real_logits, stats = disc_apply(dparams, stats, x)
            fake_logits, stats = disc_apply(dparams, stats, fake)
            d = disc_factor * d_loss_fn(real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32))
            return d, (stats, jnp.mean(real_logits), jnp.mean(fake_logits))

        def disc_update(_):
            (d, (new_stats, lr_, lf_)), dg = jax.value_and_grad(d_objective, has_aux=True)(
                state.disc_params, stats)
            upd, dopt = disc_tx.update(dg, state.disc_opt_state, state.disc_params)
            return optax.apply_updates(state.disc_params, upd), new_stats, dopt, d, lr_, lf_

        def disc_skip(_):
            z = jnp.zeros((), jnp.float32)
            return state.disc_params, stats, state.disc_opt_state, z, z, z

        dparams, dstats, dopt, d_loss, logits_real, logits_fake = jax.lax.cond(
            active, disc_update, disc_skip, None)

        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  disc_params=dparams, disc_batch_stats=dstats, disc_opt_state=dopt)
        metrics = {
            "loss": loss, "nll_loss": nll, "rec_loss": rec_mean, "p_loss": p_mean,
            ("kl_loss" if kind == "kl" else "codebook_loss"): reg, "se_loss": se,
            "g_loss": g, "d_weight": d_w, "disc_factor": disc_factor, "disc_loss": d_loss,
            "logits_real": logits_real, "logits_fake": logits_fake, "logvar": logvar,
            "grad_norm": optax.tree.norm(grads["ae"]),
        }
        return new_state, metrics

    return train_step


# ----------------------------------------------------------------------------------------------
# The task


def build_autoencoder(config) -> nn.Module:
    """``AutoencoderKL(**config.vae)`` (kind 'kl') or ``VQModel(**config.vae)`` (kind 'vq')."""
    return (AutoencoderKL if config.loss.kind == "kl" else VQModel)(**dict(config.vae))


def load_lpips(config) -> Any:
    """Published LPIPS weights from ``config.lpips.vgg_path`` (+ ``lin_path``), else None (random VGG;
    a warning when LPIPS is on)."""
    if config.lpips.vgg_path:
        return load_lpips_params(config.lpips.vgg_path, config.lpips.lin_path or None)
    if float(config.loss.perceptual_weight) > 0:
        logging.warning("lpips.vgg_path not set: LPIPS uses random VGG weights (tests/demos only)")
    return None


def make_data_iterator(config, workdir: str | None = None, rows: tuple[int, int] | None = None) -> Iterator[dict]:
    """This process's rows of every global batch (``config.train.batch_size``) of ``config.data``:
    ``{"image": float32 [b, S, S, 3] in [-1, 1]}`` at ``data.image_size`` px, with
    ``get_state()``/``set_state()`` (:func:`ldm_jax.data.make_batches`, images only)."""
    b = int(config.train.batch_size)
    if rows is None:
        share = b // jax.process_count()
        rows = (jax.process_index() * share, (jax.process_index() + 1) * share)
    return make_batches(config.data, global_batch_size=b, image_size=int(config.data.image_size), rows=rows,
                        captions=False, workdir=workdir)


class AutoencoderTask(loop.Task):
    """The first stage: an autoencoder with the LDM loss, one stage of ``train.num_steps`` steps,
    from scratch or from the VAE of ``config.init.pretrained`` (:mod:`ldm_jax.train.pretrained`).

    Args:
      config: an autoencoder config (``sd_autoencoder``).
      model: a prebuilt autoencoder (default :func:`build_autoencoder`); ``forward``: its loss
        adapter (default :func:`make_forward` of ``loss.kind``).
      params: the autoencoder's starting params (the model's tree) instead of a random init, e.g. an
        earlier run's for a decoder fine-tune (``optim.frozen``); not with ``config.init.pretrained``.
    """

    name = "autoencoder"
    progress_keys = ("rec_loss",)

    def __init__(self, config, model: nn.Module | None = None, forward: ForwardFn | None = None,
                 params: Any = None):
        super().__init__(config)
        self.model, self._forward = model, forward
        self._extra_key = (model, forward)
        self._params = params
        self._pretrained = None
        self._reconstruct = None

    def start(self):
        if self._pretrained is not None:
            return
        from ldm_jax.train.pretrained import resolve_autoencoder

        if self._params is not None and self.config.init.pretrained:
            raise ValueError("the autoencoder task got starting params and config.init.pretrained: pass one")
        self._pretrained = resolve_autoencoder(self.config)
        if self._params is not None:
            self._pretrained.vae = self._params
        self.config = self._pretrained.config
        self.model = self.model or build_autoencoder(self.config)
        self._step = make_train_step(self.config, self.model, self._forward)

    def stages(self) -> list[Stage]:
        t = self.config.train
        return [Stage(int(self.config.data.image_size), int(t.num_steps), int(t.batch_size))]

    def cache_key(self):
        return (super().cache_key(), self._extra_key)

    def init(self, key):
        c = self.config
        shape = (int(c.train.batch_size), int(c.data.image_size), int(c.data.image_size), int(c.vae["in_channels"]))
        return create_train_state(c, self.model, key, shape)

    def step(self, state, batch, aux):
        return self._step(state, batch, aux)

    def prepare_state(self, state, shardings):
        vae = self._pretrained.vae
        if vae is None:
            return state
        ae = jax.tree.map(lambda p, ref: np.asarray(p, ref.dtype), vae, state.params["ae"])
        return state.replace(params=jax.device_put(dict(state.params, ae=ae), shardings.params))

    def prepare_aux(self, aux, shardings):
        lpips_params = load_lpips(self.config)
        return aux if lpips_params is None else jax.device_put({"lpips": lpips_params}, shardings)

    def batch_spec(self, stage):
        shape = (stage.batch_size, stage.resolution, stage.resolution, int(self.config.vae["in_channels"]))
        return {"image": jax.ShapeDtypeStruct(shape, jnp.float32)}

    def batches(self, stage, rows, workdir):
        return make_data_iterator(self.config, workdir, rows)

    def preview(self, state, aux, batch):
        if self._reconstruct is None:
            from ldm_jax.train.sharding import replicated

            self._reconstruct = jax.jit(lambda p, x: self.model.apply({"params": p}, x)[0],
                                        out_shardings=replicated(batch["image"].sharding.mesh))
        n = min(int(self.config.train.preview_count), batch["image"].shape[0])
        images = np.asarray(jax.device_get(batch["image"]))[:n]
        rec = np.asarray(jax.device_get(self._reconstruct(state.params["ae"], batch["image"])))[:n]
        return {"reconstructions": image_grid(np.concatenate([images, rec]), cols=n)}


def setup(config, mesh: Mesh | None = None, model: nn.Module | None = None,
          forward: ForwardFn | None = None) -> loop.Setup:
    """The initial state and aux on ``mesh`` (default: all devices along ``config.mesh``) and the
    jitted step (:func:`ldm_jax.train.loop.setup`); compiled once per process for a configuration."""
    from ldm_jax.train import sharding

    mesh = mesh or sharding.make_mesh(dict(config.mesh))
    return loop.setup(AutoencoderTask(config, model, forward), mesh)


def train_autoencoder(config, workdir: str, model: nn.Module | None = None, forward: ForwardFn | None = None,
                      *, devices: Sequence[jax.Device] | None = None, params: Any = None
                      ) -> tuple[AETrainState, list[dict]]:
    """Train the first stage for ``config.train.num_steps`` steps with the one training loop; resumes
    from ``workdir``. ``devices``: the mesh's devices (default all); ``params``: the starting autoencoder
    (:class:`AutoencoderTask`). Returns the final state and the metrics history."""
    return loop.train(AutoencoderTask(config, model, forward, params), workdir, devices=devices)

Task = AutoencoderTask
