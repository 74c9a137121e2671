"""Rematerialisation (activation checkpointing) policies by name.

Training memory is mostly the activations the backward pass needs. A policy says which of a block's
intermediate values are kept from the forward pass; the others are recomputed in the backward:

- ``"none"``: keep everything (fastest, most memory);
- ``"full"``: keep only each block's inputs, recompute the whole block (least memory, ~1/3 more FLOPs);
- ``"dots"``: keep the outputs of matmuls without batch dimensions (the projections and
  feed-forwards), recompute the cheap elementwise work, norms, convolutions and attention;
- ``"offload"``: as ``"dots"``, but the kept values go to host memory and come back for the
  backward (TPU and GPU backends with pinned host memory; not the CPU).

The blocks are each resnet and transformer of the UNet and the autoencoder's resnets. ``True`` and
``False`` (older configs) mean ``"full"`` and ``"none"``.
"""
from __future__ import annotations

import flax.linen as nn
import jax

__all__ = ["POLICIES", "policy_name", "remat"]

POLICIES = ("none", "full", "dots", "offload")


def policy_name(policy: str | bool | None) -> str:
    """The canonical name of ``policy`` (a name of :data:`POLICIES`, a bool or None)."""
    if policy is None or policy is False or policy == "":
        return "none"
    if policy is True:
        return "full"
    if policy not in POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; expected one of {POLICIES} (or a bool)")
    return str(policy)


def _checkpoint_policy(name: str):
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return None  # "full": nothing saved


def remat(cls: type[nn.Module], policy: str | bool | None) -> type[nn.Module]:
    """``cls`` rematerialised under ``policy`` (``cls`` itself for ``"none"``)."""
    name = policy_name(policy)
    if name == "none":
        return cls
    return nn.remat(cls, policy=_checkpoint_policy(name))
