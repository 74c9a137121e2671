"""Training: one loop (:mod:`.loop`) that every task plugs into.

Tasks, chosen by ``config.task`` (module ``ldm_jax.train.<task>_task``, class ``Task``):
:mod:`.diffusion_task` (the text-conditioned UNet) and :mod:`.autoencoder_task` (the first stage).
Shared pieces: :mod:`.sharding` (mesh, FSDP rules, host-local -> global batches), :mod:`.checkpoint`
(orbax manager, preemption), :mod:`.workdir` (the workdir layout, written and read), :mod:`.optim`
(AdamW + warm-up + clipping, EMA), :mod:`.writers` (TensorBoard, metrics log), :mod:`.distributed`.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["make_task", "train"]


def make_task(config, **kwargs):
    """The task ``config.task`` names (``diffusion``, ``autoencoder``), built from ``config``;
    ``kwargs`` go to its constructor (e.g. ``frozen=`` for diffusion)."""
    try:
        module = importlib.import_module(f"ldm_jax.train.{config.task}_task")
    except ModuleNotFoundError:
        raise ValueError(f"config.task {config.task!r} is not a training task (ldm_jax.train.<task>_task); "
                         f"known: diffusion, autoencoder") from None
    return module.Task(config, **kwargs)


def train(config, workdir: str, *, devices=None, **task_kwargs) -> tuple[Any, list[dict]]:
    """Train the task of ``config`` in ``workdir`` with the one loop (what ``ldm-jax train`` does)."""
    from ldm_jax.train import loop

    return loop.train(make_task(config, **task_kwargs), workdir, devices=devices)
