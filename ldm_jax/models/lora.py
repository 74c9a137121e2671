"""LoRA: low-rank adapters on the linear layers of the UNet and the CLIP text encoder, as pure
functions of ``(params, adapters)`` (no second model, no change to the modules).

An adapted layer with kernel ``W [in, out]`` (a Dense layer, or a 1x1 conv: ``[1, 1, in, out]``)
computes ``x @ W + b + s * dropout(x) @ down @ up`` with ``down [in, r]``, ``up [r, out]`` and
``s = scale * alpha / r``. ``adapters`` is a nested dict that mirrors the model's params down to each
adapted layer: ``{"down_blocks_0": {..., "to_q": {"down": ..., "up": ...}}}``.

Two forms of the same map:

- :func:`adapted` (training): a context manager under which ``module.apply`` adds the low-rank path
  to each adapted layer (``flax.linen.intercept_methods``): gradients reach ``down``/``up`` only, the
  base weights stay frozen (and can be bf16), and dropout on the adapter's input is possible;
- :func:`merge` (sampling, ``fuse``): ``W + s * down @ up`` folded into a copy of the params, so the
  sampling loop runs the plain model on weights that are arguments (a new scale or adapter does not
  recompile it).
"""
from __future__ import annotations

import contextlib
import re
import zlib
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

__all__ = ["UNET_ATTENTION", "TEXT_ATTENTION", "linear_layers", "init_adapters", "adapted", "merge", "delta",
           "adapter_layers", "rank_of", "num_params"]

Array = jax.Array
Path = tuple[str, ...]

# The default targets: diffusers' LoRA training scripts' (the attention projections).
UNET_ATTENTION = r"attn[12]/(to_q|to_k|to_v|to_out_0)$"
TEXT_ATTENTION = r"self_attn/(q_proj|k_proj|v_proj|out_proj)$"


def _is_linear_kernel(kernel) -> bool:
    shape = tuple(kernel.shape)
    return len(shape) == 2 or (len(shape) == 4 and shape[:2] == (1, 1))


def linear_layers(params: Mapping[str, Any], patterns: str | Sequence[str] = ()) -> dict[Path, tuple[int, int]]:
    """``{path: (in, out)}`` of the linear layers (Dense, or 1x1 conv) of ``params`` whose ``/``-joined path
    matches one of the regular expressions ``patterns`` (searched), in the params' order."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    found = {}
    for path, leaf in traverse_util.flatten_dict(dict(params)).items():
        if path[-1] != "kernel" or not _is_linear_kernel(leaf):
            continue
        if any(re.search(p, "/".join(path[:-1])) for p in patterns):
            found[path[:-1]] = tuple(int(d) for d in leaf.shape[-2:])
    return found


def init_adapters(key: Array, params: Mapping[str, Any], patterns: str | Sequence[str], rank: int,
                  init: str = "gaussian", dtype=jnp.float32) -> dict:
    """Fresh adapters of ``rank`` on the layers :func:`linear_layers` selects: ``up = 0`` (the adapted
    model starts as the base), ``down ~ N(0, 1/rank^2)`` (``"gaussian"``, as diffusers' training
    scripts) or PEFT's default Kaiming-uniform ``U(-1/sqrt(in), 1/sqrt(in))`` (``"kaiming"``).
    Raises ValueError for a rank < 1 or patterns that select nothing."""
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if init not in ("gaussian", "kaiming"):
        raise ValueError(f"LoRA init must be 'gaussian' or 'kaiming', got {init!r}")
    layers = linear_layers(params, patterns)
    if not layers:
        raise ValueError(f"the LoRA targets {patterns!r} match no linear layer of the model")
    flat = {}
    for i, (path, (d_in, d_out)) in enumerate(layers.items()):
        k = jax.random.fold_in(key, i)
        if init == "gaussian":
            down = jax.random.normal(k, (d_in, rank), dtype) / rank
        else:
            bound = 1.0 / jnp.sqrt(d_in)
            down = jax.random.uniform(k, (d_in, rank), dtype, -bound, bound)
        flat[path + ("down",)] = down
        flat[path + ("up",)] = jnp.zeros((rank, d_out), dtype)
    return traverse_util.unflatten_dict(flat)


def adapter_layers(adapters: Mapping[str, Any]) -> dict[Path, dict]:
    """``{layer path: {"down": ..., "up": ...}}`` of an adapters tree."""
    flat = traverse_util.flatten_dict(dict(adapters))
    layers: dict[Path, dict] = {}
    for path, leaf in flat.items():
        layers.setdefault(path[:-1], {})[path[-1]] = leaf
    return layers


def rank_of(adapters: Mapping[str, Any]) -> int:
    """The largest rank of an adapters tree (0 when empty)."""
    return max((int(a["down"].shape[-1]) for a in adapter_layers(adapters).values()), default=0)


def num_params(adapters: Mapping[str, Any]) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapters))


def delta(down: Array, up: Array, scale) -> Array:
    """The weight change ``scale * down @ up`` ``[in, out]`` (fp32) of one adapter."""
    return jnp.asarray(scale, jnp.float32) * (down.astype(jnp.float32) @ up.astype(jnp.float32))


def merge(params: Mapping[str, Any], adapters: Iterable[tuple[Mapping[str, Any], Any]]) -> dict:
    """``params`` with each adapter of ``adapters`` (``[(adapters tree, scale), ...]``; scales may be
    traced) added to its layer's kernel: ``W + sum_i scale_i * down_i @ up_i`` in fp32, cast back to
    ``W``'s dtype. Raises ValueError for a layer that ``params`` does not have or whose shape differs."""
    flat = traverse_util.flatten_dict(dict(params))
    added: dict[Path, Array] = {}
    for tree, scale in adapters:
        for path, a in adapter_layers(tree).items():
            key = path + ("kernel",)
            if key not in flat:
                raise ValueError(f"adapter layer {'/'.join(path)} is not a layer of the model")
            kernel = flat[key]
            d = delta(a["down"], a["up"], scale)
            if tuple(kernel.shape[-2:]) != tuple(d.shape):
                raise ValueError(f"adapter layer {'/'.join(path)}: [{d.shape[0]}, {d.shape[1]}] does not fit the "
                                 f"kernel {tuple(kernel.shape)}")
            added[key] = added[key] + d if key in added else d
    for key, d in added.items():
        kernel = flat[key]
        flat[key] = (kernel.astype(jnp.float32) + d.reshape(kernel.shape)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


@contextlib.contextmanager
def adapted(adapters: Mapping[str, Any], scale=1.0, *, dropout: float = 0.0, key: Array | None = None):
    """Within this context, ``module.apply`` of the model ``adapters`` belongs to adds
    ``scale * dropout(x) @ down @ up`` to the output of each adapted layer (computed in the layer's
    dtype). ``dropout`` > 0 needs ``key`` (each layer folds in its own path); paths are relative to
    the module being applied, so enter one context per model."""
    layers = adapter_layers(adapters)
    if dropout and key is None:
        raise ValueError("LoRA dropout needs a PRNG key")

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
            return out
        a = layers.get(tuple(module.path))
        if a is None:
            return out
        x = args[0]
        dt = out.dtype
        if dropout:
            k = jax.random.fold_in(key, zlib.crc32("/".join(module.path).encode()))
            keep = jax.random.bernoulli(k, 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
        low = (x.astype(dt) @ a["down"].astype(dt)) @ a["up"].astype(dt)
        return out + (jnp.asarray(scale, jnp.float32) * low).astype(dt)

    with nn.intercept_methods(interceptor):
        yield
