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

:func:`train_autoencoder` trains ``AutoencoderKL`` (``loss.kind='kl'``) or ``VQModel`` (``'vq'``)
built from ``config.vae`` on batches of the grain pipeline (:func:`ldm_jax.data.make_iterator`)
over ``config.data.source`` (shapes_captions, an image folder, webdataset shards, tfds or in-memory
synthetic images), data-parallel over the mesh, with orbax checkpoints (state + data position,
exact resume, SIGTERM saves and stops), TensorBoard scalars/reconstructions and a progress bar.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh

from ldm_jax import xla_cpu
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import LPIPS, load_lpips_params
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import optim
from ldm_jax.train import sharding
from ldm_jax.train.writers import MetricsLog, MetricWriter, image_grid

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
    "SyntheticImageSource",
    "build_autoencoder",
    "load_lpips",
    "make_source",
    "make_data_iterator",
    "AESetup",
    "setup",
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
    """(generator, discriminator) Adams with betas (b1, b2) = (0.5, 0.9) at LDM's constant rate, or a
    cosine decay over ``optim.decay_steps`` updates when set; logvar frozen unless
    ``config.loss.learn_logvar``."""
    o = config.optim
    lr = learning_rate(config)
    if o.get("decay_steps", 0):  # a float rate otherwise, so existing checkpoints keep their optimizer-state layout
        lr = optim.learning_rate_schedule(lr, 0, o.decay_steps)
    adam = lambda: optax.adam(lr, b1=o.get("b1", 0.5), b2=o.get("b2", 0.9), eps=o.get("eps", 1e-8))
    labels = lambda params: {"ae": jax.tree.map(lambda _: "train", params["ae"]),
                             "logvar": "train" if config.loss.get("learn_logvar", False) else "freeze"}
    gen = optax.multi_transform({"train": adam(), "freeze": optax.set_to_zero()}, labels)
    return gen, adam()


def build_discriminator(config) -> NLayerDiscriminator:
    lc = config.loss
    return NLayerDiscriminator(input_nc=lc.get("disc_in_channels", 3), ndf=lc.get("disc_ndf", 64),
                               n_layers=lc.get("disc_num_layers", 3))


def _init_fn(config, model: nn.Module, image_shape: tuple[int, ...]) -> Callable:
    """Pure ``init(key, lpips_params) -> AETrainState`` (see :func:`create_train_state`)."""
    gen_tx, disc_tx = make_optimizers(config)
    disc = build_discriminator(config)
    use_lpips = float(config.loss.get("perceptual_weight", 1.0)) > 0

    def init(key, lpips_params):
        k_ae, k_d, k_l, k_rng = jax.random.split(key, 4)
        x = jnp.zeros(image_shape, jnp.float32)
        ae_params = model.init(k_ae, x)["params"]
        disc_vars = disc.init(k_d, x, train=False)
        if lpips_params is None:  # random VGG (tests); nothing when LPIPS is off
            lpips_params = LPIPS().init(k_l, x[:1], x[:1]) if use_lpips else {}
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

    return init


def create_train_state(config, model: nn.Module, key: Array, image_shape: tuple[int, ...],
                       lpips_params: Any = None) -> AETrainState:
    """Initialise autoencoder, logvar, discriminator, both optimizers and (if not given) LPIPS.

    ``image_shape``: one batch's shape [B, H, W, 3]. Without ``lpips_params`` LPIPS is randomly
    initialised (fine for tests; load the published weights for real training), or left empty
    (``{}``) when ``loss.perceptual_weight`` is 0.
    """
    # jitted: eager init of VGG/UNet-sized modules is slow op by op
    return jax.jit(_init_fn(config, model, image_shape))(key, lpips_params)


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
# Data sources


class SyntheticImageSource:
    """:func:`synthetic_images` as a random-access source (uint8 images, a fixed caption) for the
    grain pipeline: tests and demos without files."""

    def __init__(self, num: int, size: int, seed: int = 0):
        images = synthetic_images(num, size, seed)
        self.images = np.round((images + 1.0) * 127.5).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "caption": "synthetic"}

    def __repr__(self) -> str:
        return f"SyntheticImageSource({len(self)} images)"


class _ImagesOnly:
    """A caption source used for images only: a missing caption becomes a placeholder, so the
    pipeline (which skips empty captions) keeps uncaptioned images."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        rec = self.source[index]
        caption = rec.get("caption")
        return {"image": rec.get("image"), "caption": caption if caption else "<image>"}

    def __repr__(self) -> str:
        return repr(self.source)


def make_source(config, workdir: str | None = None):
    """The random-access image source of ``config.data`` (``source`` and its fields):

    - ``shapes``: the built-in ``shapes_captions`` (built on first use under ``data_dir``, default
      ``workdir/data``) at ``image_size`` with ``num_train``/``num_validation``/``num_heldout``
      examples, generation seed ``dataset_seed``, ``max_shapes`` per scene and ``shape_scale``;
      ``split`` (default ``train``).
    - ``folder``: images under ``path`` (captions optional), see :class:`ldm_jax.data.FolderSource`.
    - ``tar``: webdataset ``shards`` (glob or list), see :class:`ldm_jax.data.TarShardSource`.
    - ``tfds``: prepared tfds dataset ``name`` (``split``, ``data_dir``, ``image_key``).
    - ``synthetic``: ``num_images`` in-memory :func:`synthetic_images` (seed ``dataset_seed``).
    """
    from ldm_jax.data import sources

    d = config.data
    kind = d.get("source", "shapes")
    if kind == "shapes":
        data_dir = d.get("data_dir") or (os.path.join(workdir, "data") if workdir else None)
        if not data_dir:
            raise ValueError("data.source 'shapes' needs data.data_dir (or a workdir)")
        src = sources.shapes_source(data_dir, d.get("split", "train"), image_size=int(d.image_size),
                                    num_train=int(d.get("num_train", 2000)),
                                    num_validation=int(d.get("num_validation", 200)),
                                    num_heldout=int(d.get("num_heldout", 200)), seed=int(d.get("dataset_seed", 0)),
                                    max_shapes=int(d.get("max_shapes", 2)), shape_scale=float(d.get("shape_scale", 1.0)))
    elif kind == "folder":
        if not d.get("path"):
            raise ValueError("data.source 'folder' needs data.path")
        src = sources.FolderSource(d.path, d.get("captions_file") or None)
    elif kind == "tar":
        if not d.get("shards"):
            raise ValueError("data.source 'tar' needs data.shards")
        shards = d.shards if isinstance(d.shards, str) else list(d.shards)
        src = sources.TarShardSource(shards)
    elif kind == "tfds":
        if not d.get("name"):
            raise ValueError("data.source 'tfds' needs data.name")
        src = sources.TfdsSource(d.name, split=d.get("split", "train"), data_dir=d.get("data_dir") or None,
                                 image_key=d.get("image_key") or None, caption_key=d.get("caption_key") or None)
    elif kind == "synthetic":
        src = SyntheticImageSource(int(d.get("num_images", 64)), int(d.image_size), int(d.get("dataset_seed", 0)))
    else:
        raise ValueError(f"data.source must be one of shapes, folder, tar, tfds, synthetic; got {kind!r}")
    return _ImagesOnly(src)


def make_data_iterator(config, workdir: str | None = None, source=None):
    """This process's rows of every global batch (``config.train.batch_size``) of ``config.data``:
    a :class:`ldm_jax.data.DataIterator` over ``{"image": float32 [b, S, S, 3] in [-1, 1], "caption"}``
    with ``get_state()``/``set_state()``. Shuffled with ``data.seed`` (a new order each epoch),
    optional ``random_crop``/``random_flip``."""
    from ldm_jax.data import make_iterator

    d = config.data
    return make_iterator(source if source is not None else make_source(config, workdir),
                         global_batch_size=int(config.train.batch_size), image_size=int(d.image_size),
                         seed=int(d.get("seed", 0)), shuffle=True, random_crop=bool(d.get("random_crop", False)),
                         random_flip=bool(d.get("random_flip", False)), num_threads=int(d.get("num_threads", 2)))


# ----------------------------------------------------------------------------------------------
# Set-up on a mesh


def build_autoencoder(config) -> nn.Module:
    """``AutoencoderKL(**config.vae)`` (kind 'kl') or ``VQModel(**config.vae)`` (kind 'vq')."""
    from ldm_jax.models import autoencoder

    cls = autoencoder.AutoencoderKL if config.loss.get("kind", "kl") == "kl" else autoencoder.VQModel
    return cls(**dict(config.vae))


def load_lpips(config) -> Any:
    """Published LPIPS weights from ``config.lpips.vgg_path`` (+ ``lin_path``), else None (random VGG
    in the state; a warning when LPIPS is on)."""
    if config.get("lpips") and config.lpips.get("vgg_path"):
        return load_lpips_params(config.lpips.vgg_path, config.lpips.get("lin_path") or None)
    if float(config.loss.get("perceptual_weight", 1.0)) > 0:
        logging.warning("lpips.vgg_path not set: LPIPS uses random VGG weights (tests/demos only)")
    return None


@dataclasses.dataclass
class AESetup:
    """A fresh state on ``mesh`` and the jitted step (donates the state); data-parallel."""

    mesh: Mesh
    model: nn.Module
    state: AETrainState
    state_shardings: Any  # per-leaf NamedShardings of the state (replicated)
    batch_sharding: Any
    step_fn: Callable  # (state, {"image": [B,H,W,3]}) -> (state, metrics)


# Jitted init/step per (config, mesh, model, forward): later runs in the same process (resume, tests)
# reuse the compiled programs. Loop-only settings are not part of the key.
_LOOP_ONLY_TRAIN_KEYS = frozenset({
    "num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "keep_every", "async_checkpoints",
    "progress", "tensorboard", "image_every", "image_count"})
_SETUP_CACHE_SIZE = 4
_setup_cache: dict = {}  # insertion order = least recently used first


@dataclasses.dataclass(frozen=True)
class _CompiledSetup:
    model: nn.Module
    key: Array
    replicated: Any
    batch_sharding: Any
    init_fn: Callable  # (key, lpips_params) -> state
    step_fn: Callable


def _setup_key(config, mesh, model, forward):
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    parts = {"vae": c.get("vae"), "loss": c.get("loss"), "optim": c.get("optim"),
             "image_size": dict(c.get("data", {})).get("image_size"),
             "train": {k: v for k, v in dict(c.get("train", {})).items() if k not in _LOOP_ONLY_TRAIN_KEYS}}
    key = (json.dumps(parts, sort_keys=True, default=repr), mesh, model, forward)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _compiled_setup(config, mesh: Mesh, model: nn.Module | None, forward: ForwardFn | None) -> _CompiledSetup:
    key = _setup_key(config, mesh, model, forward)
    hit = _setup_cache.pop(key, None) if key is not None else None
    if hit is None:
        model = model or build_autoencoder(config)
        t, d = config.train, config.data
        n = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
        if t.batch_size % n:
            raise ValueError(f"train.batch_size {t.batch_size} is not divisible by the {n} data-parallel devices")
        shape = (int(t.batch_size), int(d.image_size), int(d.image_size), int(config.vae.get("in_channels", 3)))
        init = _init_fn(config, model, shape)
        rng_key = jax.random.PRNGKey(int(t.get("seed", 0)))
        rep = sharding.replicated(mesh)
        batch_sh = sharding.batch_sharding(mesh)
        opts = xla_cpu.train_compiler_options(t, backend=mesh.devices.flat[0].platform)
        init_fn = jax.jit(init, out_shardings=rep, compiler_options=opts)
        step_fn = jax.jit(make_train_step(config, model, forward), donate_argnums=0,
                          in_shardings=(rep, batch_sh), out_shardings=(rep, rep), compiler_options=opts)
        hit = _CompiledSetup(model, rng_key, rep, batch_sh, init_fn, step_fn)
    if key is not None:
        _setup_cache[key] = hit
        while len(_setup_cache) > _SETUP_CACHE_SIZE:
            _setup_cache.pop(next(iter(_setup_cache)))
    return hit


def setup(config, mesh: Mesh | None = None, model: nn.Module | None = None, forward: ForwardFn | None = None,
          lpips_params: Any = None) -> AESetup:
    """Fresh state (seed ``config.train.seed``, replicated on ``mesh``, default all devices along
    ``data``) and the jitted step (batch split over the mesh's data axes). The jitted init and step
    are reused by later calls with the same config (loop-only settings aside), mesh, model, forward.
    """
    mesh = mesh or sharding.make_mesh(dict(config.get("mesh", {"data": -1})))
    c = _compiled_setup(config, mesh, model, forward)
    state = c.init_fn(c.key, lpips_params)
    return AESetup(mesh, c.model, state, jax.tree.map(lambda _: c.replicated, state), c.batch_sharding, c.step_fn)


# ----------------------------------------------------------------------------------------------
# Loop


def _write_config(workdir: str, config) -> None:
    if jax.process_index() != 0:
        return
    to_json = getattr(config, "to_json_best_effort", None)
    text = to_json(indent=2, sort_keys=True) if to_json else json.dumps(dict(config), indent=2, default=repr)
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, os.path.join(workdir, "config.json"))


def train_autoencoder(config, workdir: str, model: nn.Module | None = None, forward: ForwardFn | None = None,
                      *, source=None, devices: Sequence[jax.Device] | None = None
                      ) -> tuple[AETrainState, list[dict]]:
    """Train the first stage for ``config.train.num_steps`` steps; resumes from ``workdir/checkpoints``.

    Data-parallel over ``devices`` (default all; mesh ``config.mesh``, default ``{"data": -1}``),
    global batch ``config.train.batch_size`` from :func:`make_data_iterator` over ``config.data``
    (or ``source``, any random-access image source). Multi-host: set ``config.distributed``; each
    process reads its rows. Checkpoints (state without the frozen LPIPS weights, plus the data
    iterator's position) every ``train.checkpoint_every`` steps and at the end (keep
    ``keep_checkpoints``, and every ``keep_every`` forever); a resumed run is bit-identical to an
    uninterrupted one. SIGTERM saves a checkpoint and returns. Writes ``workdir/config.json``,
    TensorBoard scalars (``workdir/tensorboard``, every ``log_every`` steps) and input /
    reconstruction grids every ``image_every`` steps (0: off); shows a progress bar.

    Returns: the final state and the logged metrics (dicts with ``step``, every ``log_every`` steps
    and the last step).
    """
    from tqdm.auto import tqdm

    sharding.maybe_initialize_distributed(config.get("distributed"))
    t = config.train
    if t.get("compilation_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(t.compilation_cache_dir))
    mesh = sharding.make_mesh(dict(config.get("mesh", {"data": -1})), devices)
    os.makedirs(workdir, exist_ok=True)
    _write_config(workdir, config)
    lpips_params = load_lpips(config)
    ts = setup(config, mesh, model, forward, lpips_params)
    state, model = ts.state, ts.model
    num_steps = int(t.num_steps)
    save_every = int(t.get("checkpoint_every", 1000))
    ckpt = ckpt_lib.CheckpointManager(
        os.path.join(workdir, "checkpoints"), save_every=save_every, keep_last=int(t.get("keep_checkpoints", 3)),
        keep_every=t.get("keep_every") or None, async_save=bool(t.get("async_checkpoints", True)))
    it = make_data_iterator(config, workdir, source)
    # LPIPS weights are frozen inputs, not training state: they stay out of the checkpoints.
    without_lpips = lambda s: s.replace(lpips_params=None)  # noqa: E731
    if ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(without_lpips(ckpt_lib.abstract_like(state, ts.state_shardings)))
        state = restored.replace(lpips_params=state.lpips_params)
        data = meta.get("data")
        if data is not None:
            it.set_state(data[jax.process_index()])
        logging.info("autoencoder: resumed from step %d", int(state.step))
    start = step = int(state.step)

    writer = MetricWriter(os.path.join(workdir, "tensorboard") if t.get("tensorboard", True) else None)
    bar = tqdm(total=num_steps, initial=start, desc="autoencoder", dynamic_ncols=True,
               disable=not t.get("progress", True) or jax.process_index() != 0)
    log_every = int(t.get("log_every", 50))
    image_every = int(t.get("image_every", 0) or 0)
    if image_every:
        reconstruct = jax.jit(lambda p, x: model.apply({"params": p}, x)[0], out_shardings=sharding.replicated(mesh))
    metrics_log = MetricsLog(rate_in_history=True)
    try:
        with ckpt_lib.PreemptionGuard() as guard:
            while step < num_steps:
                images = np.asarray(next(it)["image"], np.float32)
                batch = sharding.make_global_batch(mesh, {"image": images}, int(t.batch_size))
                state, metrics = ts.step_fn(state, batch)
                step += 1
                metrics_log.add(step, metrics, int(t.batch_size))
                bar.update(1)
                if step % log_every == 0 or step == num_steps:
                    m = metrics_log.flush()
                    writer.scalars(step, {k: v for k, v in m.items() if k != "step"})
                    bar.set_postfix(loss=f"{m['loss']:.4g}", rec=f"{m['rec_loss']:.4g}")
                if image_every and step % image_every == 0:
                    n = min(int(t.get("image_count", 8)), int(t.batch_size))
                    rec = np.asarray(jax.device_get(reconstruct(state.params["ae"], batch["image"])))[:n]
                    writer.image(step, "reconstructions", image_grid(np.concatenate([images[:n], rec]), cols=n))

                def checkpoint_meta():  # gathers every process's data position: a collective
                    return {"step": step, "data": ckpt_lib.allgather_json(it.get_state())}

                if ckpt.save_or_stop(guard, step, without_lpips(state), checkpoint_meta, last=step == num_steps):
                    break
    finally:
        history = metrics_log.close()
        bar.close()
        ckpt.close()
        writer.close()
    return state, history
