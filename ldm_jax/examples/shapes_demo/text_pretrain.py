"""Supervised pretraining of a text encoder on labelled captions, before it is frozen.

Stable Diffusion conditions on a *pretrained* CLIP text encoder and keeps it frozen. A model
trained from nothing (the CPU demo) has no such encoder, and a frozen *random* one mixes the words
of a caption so that "a red circle on a blue background" and "a blue circle on a red background"
are hard to tell apart. This module is the small stand-in for CLIP's pretraining: the encoder's
output at every position from the end-of-text token on (the positions that have read the whole
caption; CLIP's pooled output is the first of them) is trained to predict the caption's labels
(e.g. shape, colour, position) through linear heads, which are then thrown away.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["pretrain_text_encoder", "pooled_features", "probe_accuracy"]


def _tail_mask(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """float32 [B, L]: 1 from the first ``eos_token_id`` of each row on (padding repeats it in SD)."""
    is_eos = input_ids == eos_token_id
    first = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1), input_ids.shape[1] - 1)
    return (jnp.arange(input_ids.shape[1])[None] >= first[:, None]).astype(jnp.float32)


def _heads_init(key, hidden: int, num_classes: Mapping[str, int]) -> dict:
    keys = jax.random.split(key, len(num_classes))
    return {name: {"kernel": jax.random.normal(k, (hidden, n), jnp.float32) / np.sqrt(hidden),
                   "bias": jnp.zeros((n,), jnp.float32)}
            for k, (name, n) in zip(keys, sorted(num_classes.items()))}


def _logits(model, params, input_ids):
    """``{label: float32 [B, L, classes]}`` and the tail mask [B, L]."""
    hidden = model.apply({"params": params["encoder"]}, input_ids).last_hidden_state.astype(jnp.float32)
    logits = {k: hidden @ h["kernel"] + h["bias"] for k, h in params["heads"].items()}
    return logits, _tail_mask(input_ids, model.eos_token_id)


def pretrain_text_encoder(model, params, input_ids: np.ndarray, labels: Mapping[str, np.ndarray], *,
                          steps: int = 500, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                          progress: bool = True) -> tuple[dict, list[dict]]:
    """Train ``model`` (a :class:`~ldm_jax.models.clip_text.CLIPTextModel`) to read labels from captions.

    Args:
      params: the encoder's initial params (e.g. random).
      input_ids: int32 [N, 77] tokenised captions.
      labels: ``{name: int [N]}`` class indices per caption (classes = max + 1 over the data).
      steps, batch_size, lr: AdamW with cosine decay; batches drawn with ``seed``.
    Returns:
      (encoder params, history of ``{"step", "loss", "accuracy"}`` every 25 steps).
    """
    input_ids = np.asarray(input_ids, np.int32)
    n = len(input_ids)
    if n == 0 or not labels:
        raise ValueError("pretrain_text_encoder needs captions and at least one label")
    labels = {k: np.asarray(v, np.int32) for k, v in labels.items()}
    if any(len(v) != n for v in labels.values()):
        raise ValueError(f"labels must have one entry per caption ({n})")
    num_classes = {k: int(v.max()) + 1 for k, v in labels.items()}
    key_heads, key_batches = jax.random.split(jax.random.key(seed))
    train_params = {"encoder": params, "heads": _heads_init(key_heads, model.hidden_size, num_classes)}
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 10 + 1), steps), weight_decay=1e-4)
    opt_state = tx.init(train_params)

    def loss_fn(p, ids, y):
        logits, mask = _logits(model, p, ids)
        per = [optax.softmax_cross_entropy_with_integer_labels(logits[k], y[k][:, None]) for k in sorted(y)]
        loss = jnp.sum(jnp.mean(jnp.stack(per), 0) * mask) / jnp.sum(mask)
        acc = jnp.mean(jnp.stack([jnp.sum((jnp.argmax(logits[k], -1) == y[k][:, None]) * mask) / jnp.sum(mask)
                                  for k in sorted(y)]))
        return loss, acc

    @jax.jit
    def step(p, opt_state, key, all_ids, all_labels):  # the data are arguments, not baked-in constants
        rows = jax.random.randint(key, (batch_size,), 0, n)
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            p, all_ids[rows], {k: v[rows] for k, v in all_labels.items()})
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss, acc

    from tqdm.auto import tqdm

    all_ids, all_labels = jnp.asarray(input_ids), {k: jnp.asarray(v) for k, v in labels.items()}
    history = []
    for i in tqdm(range(steps), desc="text encoder", dynamic_ncols=True, disable=not progress):
        train_params, opt_state, loss, acc = step(train_params, opt_state, jax.random.fold_in(key_batches, i),
                                                  all_ids, all_labels)
        if i % 25 == 0 or i == steps - 1:
            history.append({"step": i, "loss": float(loss), "accuracy": float(acc)})
    return jax.device_get(train_params["encoder"]), history


def pooled_features(model, params, input_ids: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float32 [N, hidden]: the encoder's output at the end-of-text token of each caption."""
    f = jax.jit(lambda ids: model.apply({"params": params}, ids).pooler_output)
    ids = np.asarray(input_ids, np.int32)
    return np.concatenate([np.asarray(f(jnp.asarray(ids[i:i + batch_size]))) for i in range(0, len(ids), batch_size)])


def probe_accuracy(train_feats, train_labels, test_feats, test_labels, *, steps: int = 300) -> dict[str, float]:
    """Linear probe: heads fitted on ``train_feats`` (full-batch Adam), accuracy on ``test_feats``."""
    train_feats, test_feats = jnp.asarray(train_feats, jnp.float32), jnp.asarray(test_feats, jnp.float32)
    mu, sd = train_feats.mean(0), train_feats.std(0) + 1e-6
    xtr, xte = (train_feats - mu) / sd, (test_feats - mu) / sd
    tx = optax.adam(0.05)

    @jax.jit
    def fit(w, st, x, y):
        loss = lambda w: optax.softmax_cross_entropy_with_integer_labels(x @ w["kernel"] + w["bias"], y).mean()  # noqa: E731
        u, st = tx.update(jax.grad(loss)(w), st)
        return optax.apply_updates(w, u), st

    out = {}
    for name in sorted(train_labels):
        ytr = jnp.asarray(train_labels[name], jnp.int32)
        k = int(max(np.max(train_labels[name]), np.max(test_labels[name]))) + 1
        w = {"kernel": jnp.zeros((xtr.shape[1], k)), "bias": jnp.zeros((k,))}
        st = tx.init(w)
        for _ in range(steps):
            w, st = fit(w, st, xtr, ytr)
        pred = np.asarray(jnp.argmax(xte @ w["kernel"] + w["bias"], -1))
        out[name] = float(np.mean(pred == np.asarray(test_labels[name])))
    out["mean"] = float(np.mean(list(out.values())))
    return out
