"""Autoencoder training (LDM first stage): L1 + LPIPS + PatchGAN with an adaptive weight, KL or VQ.

The loss is LDM's ``LPIPSWithDiscriminator`` (KL models) / taming's ``VQLPIPSWithDiscriminator``:

  rec   = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)                      (per pixel)
  nll   = sum(rec / exp(logvar) + logvar) / B        (KL; ``vq``: mean(rec), no logvar)
  g     = -mean D(x_rec)
  d_w   = clip(||dnll/dL|| / (||dg/dL|| + 1e-4), 0, 1e4) * disc_weight      (L: decoder's last conv)
  loss  = nll + kl_weight * KL  (or + codebook_weight * codebook_loss)  + d_w * disc_factor * g
  d_loss = disc_factor * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))    (hinge)

with ``disc_factor = 0`` for ``step < disc_start``. One jitted :func:`train_step` updates the
generator (autoencoder) with one Adam, then the discriminator with another (betas 0.5, 0.9).

Notes on fidelity to the PyTorch recipe:
- the discriminator step reuses this step's (pre-update) reconstruction instead of running the
  autoencoder again (Lightning re-runs the forward with the updated weights): one forward saved;
- before ``disc_start`` the discriminator is not run at all (its params, BatchNorm statistics
  and optimizer state stay untouched; in PyTorch its zero-gradient Adam steps are no-ops too);
- LDM's optimizer does not include ``logvar`` (it stays at its init, 0); ``learn_logvar=True``
  trains it, as later Stability code does.
- the dL gradients of the adaptive weight come from the same vjp as the update (no second
  forward pass); under jit only the last conv's transpose is computed for them.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import LPIPS, load_lpips_params

__all__ = [
    "AETrainState",
    "hinge_d_loss",
    "vanilla_d_loss",
    "adaptive_weight",
    "adopt_weight",
    "make_forward",
    "make_optimizers",
    "create_train_state",
    "make_train_step",
    "synthetic_images",
    "synthetic_batches",
    "train_autoencoder",
]

Array = jax.Array
# (params, images [B,H,W,3], key) -> (reconstruction [B,H,W,3], per-example regulariser [B] or scalar)
ForwardFn = Callable[[Any, Array, Array], tuple[Array, Array]]


@flax.struct.dataclass
class AETrainState:
    """Everything a resumed run needs. ``params = {'ae': ..., 'logvar': scalar}``."""

    step: Array
    params: Any
    opt_state: Any
    disc_params: Any
    disc_batch_stats: Any
    disc_opt_state: Any
    lpips_params: Any  # frozen
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


def adopt_weight(weight: float, step: Array, threshold: int, value: float = 0.0) -> Array:
    """``weight`` once ``step >= threshold``, else ``value`` (taming's ``adopt_weight``)."""
    return jnp.where(step >= threshold, weight, value)


def adaptive_weight(nll_grad: Any, g_grad: Any, disc_weight: float) -> Array:
    """clip(||nll_grad|| / (||g_grad|| + 1e-4), 0, 1e4) * disc_weight, gradient stopped."""
    w = optax.tree.norm(nll_grad) / (optax.tree.norm(g_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)


# ----------------------------------------------------------------------------------------------
# Model adapters


def make_forward(model: nn.Module, kind: str = "kl") -> ForwardFn:
    """Adapter ``(params, x, key) -> (reconstruction, regulariser)`` for the loss.

    ``kind='kl'``: ``AutoencoderKL``-like, ``model.apply(p, x, key=key, sample_posterior=True)``
    -> ``(rec, posterior)``; regulariser ``posterior.kl()`` [B].
    ``kind='vq'``: ``model.apply(p, x)`` -> ``(rec, codebook_loss, ...)`` or ``(rec, info)`` with
    ``info['loss']``/``info['codebook_loss']``; regulariser the codebook loss.
    """
    if kind == "kl":

        def forward(params, x, key):
            rec, posterior = model.apply({"params": params}, x, key=key, sample_posterior=True)
            return rec, posterior.kl()

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
    if not o.get("scale_lr", True):
        return float(o.base_learning_rate)
    return float(o.base_learning_rate) * config.train.batch_size * config.train.get("accumulation", 1)


def make_optimizers(config) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """(generator, discriminator) Adams with betas (b1, b2) = (0.5, 0.9); logvar frozen unless
    ``config.loss.learn_logvar``."""
    lr = learning_rate(config)
    o = config.optim
    adam = lambda: optax.adam(lr, b1=o.get("b1", 0.5), b2=o.get("b2", 0.9), eps=o.get("eps", 1e-8))
    labels = lambda params: {"ae": jax.tree.map(lambda _: "train", params["ae"]),
                             "logvar": "train" if config.loss.get("learn_logvar", False) else "freeze"}
    gen = optax.multi_transform({"train": adam(), "freeze": optax.set_to_zero()}, labels)
    return gen, adam()


def build_discriminator(config) -> NLayerDiscriminator:
    lc = config.loss
    return NLayerDiscriminator(input_nc=lc.get("disc_in_channels", 3), ndf=lc.get("disc_ndf", 64),
                               n_layers=lc.get("disc_num_layers", 3))


def create_train_state(config, model: nn.Module, key: Array, image_shape: tuple[int, ...],
                       lpips_params: Any = None) -> AETrainState:
    """Initialise autoencoder, logvar, discriminator, both optimizers and (if not given) LPIPS.

    ``image_shape``: one batch's shape [B, H, W, 3]. Without ``lpips_params`` LPIPS is randomly
    initialised (fine for tests; load the published weights for real training).
    """
    gen_tx, disc_tx = make_optimizers(config)
    disc = build_discriminator(config)

    @jax.jit  # eager init of VGG/UNet-sized modules is slow op by op
    def init(key, lpips_params):
        k_ae, k_d, k_l, k_rng = jax.random.split(key, 4)
        x = jnp.zeros(image_shape, jnp.float32)
        ae_params = model.init(k_ae, x)["params"]
        disc_vars = disc.init(k_d, x, train=False)
        if lpips_params is None:
            lpips_params = LPIPS().init(k_l, x[:1], x[:1])
        params = {"ae": ae_params, "logvar": jnp.asarray(config.loss.get("logvar_init", 0.0), jnp.float32)}
        return AETrainState(
            step=jnp.asarray(0, jnp.int32),
            params=params,
            opt_state=gen_tx.init(params),
            disc_params=disc_vars["params"],
            disc_batch_stats=disc_vars["batch_stats"],
            disc_opt_state=disc_tx.init(disc_vars["params"]),
            lpips_params=lpips_params,
            rng=jax.random.key_data(k_rng) if jnp.issubdtype(k_rng.dtype, jax.dtypes.prng_key) else k_rng,
        )

    return init(key, lpips_params)


# ----------------------------------------------------------------------------------------------
# The step


def make_train_step(config, model: nn.Module, forward: ForwardFn | None = None):
    """Return the pure ``train_step(state, batch) -> (state, metrics)`` (not yet jitted).

    ``batch``: an image array [B, H, W, 3] in [-1, 1] or a dict with key ``'image'``.
    """
    lc = config.loss
    kind = lc.get("kind", "kl")
    forward = forward or make_forward(model, kind)
    disc = build_discriminator(config)
    lpips = LPIPS()
    gen_tx, disc_tx = make_optimizers(config)
    last_layer = tuple(lc.get("last_layer", ("decoder", "conv_out", "kernel")))
    pw = float(lc.get("perceptual_weight", 1.0))
    pixel_w = float(lc.get("pixelloss_weight", 1.0))
    # "l1" is LDM's; "l2" weighs large errors (small objects lost on a flat background) far more,
    # which a short from-scratch run (the CPU demo) needs to keep small shapes.
    pixel_loss = {"l1": jnp.abs, "l2": jnp.square}[lc.get("pixel_loss", "l1")]
    reg_w = float(lc.kl_weight if kind == "kl" else lc.get("codebook_weight", 1.0))
    disc_weight = float(lc.get("disc_weight", 0.5))
    disc_factor_cfg = float(lc.get("disc_factor", 1.0))
    disc_start = int(lc.get("disc_start", 0))
    d_loss_fn = _D_LOSSES[lc.get("disc_loss", "hinge")]

    def nll_fn(rec_img, logvar, x, lpips_params):
        rec = pixel_w * pixel_loss(x - rec_img)
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

    def train_step(state: AETrainState, batch):
        x = batch["image"] if isinstance(batch, Mapping) else batch
        x = x.astype(jnp.float32)
        key = jax.random.fold_in(state.rng, state.step)
        ae_params, logvar = state.params["ae"], state.params["logvar"]
        kernel = _get_path(ae_params, last_layer)

        def fwd(kernel, ae_params):
            rec_img, reg = forward(_set_path(ae_params, last_layer, kernel), x, key)
            return rec_img.astype(jnp.float32), jnp.sum(reg) / x.shape[0] if jnp.ndim(reg) else reg

        (rec_img, reg), vjp_fn = jax.vjp(fwd, kernel, ae_params)
        (nll, (rec_mean, p_mean)), (c_nll, c_logvar) = jax.value_and_grad(
            nll_fn, argnums=(0, 1), has_aux=True)(rec_img, logvar, x, state.lpips_params)

        disc_factor = adopt_weight(disc_factor_cfg, state.step, disc_start)
        active = disc_factor > 0

        def with_disc(_):
            (g, new_stats), c_g = jax.value_and_grad(g_fn, has_aux=True)(
                rec_img, state.disc_params, state.disc_batch_stats)
            zero = jnp.zeros_like(reg)
            dk_nll = vjp_fn((c_nll, zero))[0]
            dk_g = vjp_fn((c_g, zero))[0]
            d_w = adaptive_weight(dk_nll, dk_g, disc_weight)
            return g, c_g, d_w, new_stats

        def without_disc(_):
            return (jnp.zeros((), jnp.float32), jnp.zeros_like(rec_img), jnp.zeros((), jnp.float32),
                    state.disc_batch_stats)

        g, c_g, d_w, stats = jax.lax.cond(active, with_disc, without_disc, None)
        coef = d_w * disc_factor
        loss = nll + reg_w * reg + coef * g
        dk, d_ae = vjp_fn((c_nll + coef * c_g, jnp.asarray(reg_w, reg.dtype)))
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
            ("kl_loss" if kind == "kl" else "codebook_loss"): reg,
            "g_loss": g, "d_weight": d_w, "disc_factor": disc_factor, "disc_loss": d_loss,
            "logits_real": logits_real, "logits_fake": logits_fake, "logvar": logvar,
            "grad_norm": optax.tree.norm(grads["ae"]),
        }
        return new_state, metrics

    return train_step


# ----------------------------------------------------------------------------------------------
# Data


def synthetic_images(num: int, size: int, seed: int = 0) -> np.ndarray:
    """``num`` smooth RGB images [num, size, size, 3] in [-1, 1]: a colour gradient plus a disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    out = np.empty((num, size, size, 3), np.float32)
    for i in range(num):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        img = a * xx[..., None] + b * yy[..., None] + 0.3 * c
        cy, cx, r = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.2, 0.6)
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)[..., None]
        img = np.where(inside, rng.uniform(-1, 1, 3), img)
        out[i] = np.clip(img, -1, 1)
    return out


def synthetic_batches(images: np.ndarray, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[np.ndarray]:
    """Endless shuffled batches; batch ``n`` depends only on (seed, n), so a resume at step n
    continues the same sequence."""
    n = len(images)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} synthetic images")
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        perm = np.random.default_rng((seed, epoch)).permutation(n)
        yield images[perm[i * batch_size:(i + 1) * batch_size]]
        step += 1


# ----------------------------------------------------------------------------------------------
# Entry point


def build_autoencoder(config) -> nn.Module:
    """``AutoencoderKL(**config.vae)`` (kind 'kl') or ``VQModel(**config.vae)`` (kind 'vq')."""
    from ldm_jax.models import autoencoder

    cls = autoencoder.AutoencoderKL if config.loss.get("kind", "kl") == "kl" else autoencoder.VQModel
    return cls(**dict(config.vae))


def _checkpoint_manager(workdir: str, config):
    import orbax.checkpoint as ocp

    t = config.train
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=t.get("keep_checkpoints", 3),
                                             save_interval_steps=t.get("checkpoint_every", 1000),
                                             create=True),
    )


def train_autoencoder(config, workdir: str, model: nn.Module | None = None,
                      forward: ForwardFn | None = None) -> tuple[AETrainState, list[dict]]:
    """Train the first stage: data-parallel over all devices, orbax checkpoints in
    ``workdir/checkpoints`` (resumes from the latest), a tqdm bar. Returns the final state and
    the logged metrics (every ``config.train.log_every`` steps).

    Data: ``config.data.source == 'synthetic'`` (in-memory images, see :func:`synthetic_images`).
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    t, d = config.train, config.data
    if d.get("source", "synthetic") != "synthetic":
        raise ValueError(f"data.source {d.source!r} is not supported by train_autoencoder yet (use 'synthetic')")
    model = model or build_autoencoder(config)
    n_dev = jax.device_count()
    if t.batch_size % n_dev:
        raise ValueError(f"train.batch_size {t.batch_size} is not divisible by the {n_dev} devices")
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    shape = (t.batch_size, d.image_size, d.image_size, 3)

    lpips_params = None
    if config.get("lpips") and config.lpips.get("vgg_path"):
        lpips_params = load_lpips_params(config.lpips.vgg_path, config.lpips.get("lin_path"))
    elif config.loss.get("perceptual_weight", 1.0) > 0:
        logging.warning("lpips.vgg_path not set: LPIPS uses random VGG weights (tests/demos only)")
    init = functools.partial(create_train_state, config, model, image_shape=shape, lpips_params=lpips_params)
    state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(t.get("seed", 0)))

    os.makedirs(workdir, exist_ok=True)
    mngr = _checkpoint_manager(workdir, config)
    if mngr.latest_step() is not None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
    start = int(state.step)

    step_fn = jax.jit(make_train_step(config, model, forward), donate_argnums=0,
                      in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated))
    images = synthetic_images(d.get("num_images", 64), d.image_size, d.get("seed", 0))
    batches = synthetic_batches(images, t.batch_size, t.get("seed", 0), start_step=start)
    history = []
    bar = tqdm(range(start, t.num_steps), initial=start, total=t.num_steps, desc="autoencoder",
               disable=not t.get("progress", True))
    t0 = time.perf_counter()
    for step in bar:
        batch = jax.device_put(next(batches), batch_sharding)
        state, metrics = step_fn(state, batch)
        if (step + 1) % t.get("log_every", 50) == 0 or step + 1 == t.num_steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            m["step"] = step + 1
            m["images_per_s"] = (step + 1 - start) * t.batch_size / (time.perf_counter() - t0)
            history.append(m)
            bar.set_postfix(loss=f"{m['loss']:.4g}", rec=f"{m['rec_loss']:.4g}")
        mngr.save(step + 1, args=ocp.args.StandardSave(state), force=step + 1 == t.num_steps)
    mngr.wait_until_finished()
    mngr.close()
    return state, history
