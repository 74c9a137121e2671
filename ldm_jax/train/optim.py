"""Optimizer (AdamW + linear warm-up, optional cosine decay + global-norm clipping) and the LDM EMA."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

__all__ = ["learning_rate_schedule", "make_optimizer", "scale_groups", "ema_decay", "ema_update"]


def learning_rate_schedule(lr: float, warmup_steps: int = 0, decay_steps: int = 0,
                           final_fraction: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps`` optimizer updates, then constant (SD's
    recipe, ``decay_steps=0``) or a cosine decay to ``final_fraction * lr`` at update ``decay_steps``
    (counted from the first update, warm-up included) and constant after it.

    The decay is for short runs (tests, the CPU demo): annealing the rate at the end of a fixed budget
    lowers the loss the run ends at.
    """
    if lr < 0 or warmup_steps < 0 or decay_steps < 0:
        raise ValueError(f"lr ({lr}), warmup_steps ({warmup_steps}) and decay_steps ({decay_steps}) must be >= 0")
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"final_fraction must be in [0, 1], got {final_fraction}")
    if decay_steps:
        if decay_steps <= warmup_steps:
            raise ValueError(f"decay_steps ({decay_steps}) must exceed warmup_steps ({warmup_steps})")
        return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else lr, lr, warmup_steps, decay_steps,
                                                  end_value=final_fraction * lr)
    if warmup_steps == 0:
        return optax.constant_schedule(lr)
    return optax.linear_schedule(0.0, lr, warmup_steps)


def make_optimizer(lr: float, warmup_steps: int = 0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 1e-2, grad_clip_norm: float | None = 1.0,
                   decay_steps: int = 0, mu_dtype: str | None = None,
                   group_lr_scales: Mapping[str, float] | None = None) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip_norm)`` then AdamW with :func:`learning_rate_schedule`.

    ``group_lr_scales``: ``{top-level params key: factor}``, that group's learning rate (and so its
    decoupled weight decay) times the factor, e.g. ``{"text_encoder": 4.0}`` for a text encoder trained
    from scratch beside a UNet. Factors of 1 add nothing to the optimizer state.

    ``mu_dtype`` (e.g. ``"bfloat16"``): the first moment's dtype (optax's ``mu_dtype``; None or "": the
    parameters'); it halves that quarter of the training state. The second moment stays in the
    parameters' dtype: its squares need the range.

    The schedule follows the optimizer's own update count, so skipped (non-finite) steps do not
    advance the warm-up.
    """
    chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    chain.append(optax.adamw(learning_rate_schedule(lr, warmup_steps, decay_steps), b1=b1, b2=b2, eps=eps,
                             weight_decay=weight_decay, mu_dtype=mu_dtype or None))
    scales = {k: float(v) for k, v in (group_lr_scales or {}).items() if float(v) != 1.0}
    if any(not v > 0 for v in scales.values()):
        raise ValueError(f"learning-rate scales must be > 0, got {dict(group_lr_scales)}")
    if scales:
        chain.append(scale_groups(scales))
    return optax.chain(*chain)


def scale_groups(scales: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply the updates of the named top-level groups of a params dict by their factor."""

    def update_fn(updates, state, params=None):
        del params
        missing = sorted(set(scales) - set(updates))
        if missing:
            raise ValueError(f"learning-rate scales for {missing}: no such parameter group (have {sorted(updates)})")
        return {k: jax.tree.map(lambda u, f=scales[k]: u * f, v) if k in scales else v
                for k, v in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def ema_decay(num_updates: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """LDM: ``min(decay, (1 + n) / (10 + n))`` with ``n`` the number of updates so far (1 on the first)."""
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n)) if warmup else jnp.asarray(decay, jnp.float32)


def ema_update(ema_params: Any, params: Any, decay: jax.Array) -> Any:
    """``ema <- decay * ema + (1 - decay) * params`` (LDM's ``ema -= (1 - decay) * (ema - params)``)."""
    return jax.tree.map(lambda e, p: e - (1.0 - decay).astype(e.dtype) * (e - p.astype(e.dtype)),
                        ema_params, params)
