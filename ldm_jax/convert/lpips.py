"""PyTorch LPIPS-VGG weights -> params of :class:`ldm_jax.models.lpips.LPIPS`.

:func:`lpips_torch_key` renames torchvision and ``lpips.LPIPS`` keys onto the LPIPS parameter
tree (with the one table :data:`ldm_jax.models.lpips.VGG16_FEATURE_SLICES`), and
:func:`ldm_jax.convert.torch_flax.torch_to_flax` does the rest. :func:`load_lpips_params` reads
the published files: torchvision's VGG16 and lpips' linear heads.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.torch_flax import WeightsError, torch_to_flax
from ldm_jax.models.lpips import LPIPS, VGG16_FEATURE_SLICES

__all__ = ["lpips_torch_key", "lpips_params_from_torch", "load_lpips_params"]


def lpips_torch_key(key: str) -> str | None:
    """Rename a torchvision/lpips PyTorch key to the ``lpips.LPIPS`` key our tree mirrors.

    ``features.N.*`` (torchvision vgg16) and ``net.slice{k}.N.*`` (lpips) -> ``net.features.N.*``;
    ``lin{k}.model.0.weight`` (a head saved without dropout) -> ``lin{k}.model.1.weight``;
    other lpips keys pass unchanged; keys with no place in LPIPS (classifier, scaling buffers, the
    ``lins.K`` aliases) -> None.
    """
    m = re.fullmatch(r"(?:.*\.)?features\.(\d+)\.(weight|bias)", key)
    if m:
        idx = int(m.group(1))
        if idx not in VGG16_FEATURE_SLICES:
            return None  # VGG16 has no conv there; the caller reports it as unexpected
        return f"net.features.{idx}.{m.group(2)}"
    m = re.fullmatch(r"net\.slice(\d)\.(\d+)\.(weight|bias)", key)
    if m:
        if VGG16_FEATURE_SLICES.get(int(m.group(2))) != int(m.group(1)):
            return key  # not a VGG16 conv position: reported as unexpected
        return f"net.features.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"lin(\d)\.model\.0\.weight", key)
    if m:
        return f"lin{m.group(1)}.model.1.weight"
    # lins.K is lpips' ModuleList alias of linK (same tensors); scaling_layer holds constants.
    if key.startswith(("classifier.", "scaling_layer.", "lins.")):
        return None
    return key


def lpips_params_from_torch(*state_dicts: Mapping[str, Any], source: str = "LPIPS weights") -> dict:
    """Build LPIPS Flax params from PyTorch state dicts (merged in order).

    Accepts any mix of: a torchvision ``vgg16`` state dict (``features.N.*``, ``classifier.*``
    ignored), an ``lpips.LPIPS`` state dict (``net.sliceK.N.*``, ``linK.model.1.weight``), and
    lpips' published ``vgg.pth`` (the linear heads only).

    Returns:
      ``{'params': ...}`` ready for ``LPIPS().apply``.
    Raises:
      WeightsError: naming missing/unexpected keys or shape mismatches.
    """
    merged: dict[str, np.ndarray] = {}
    for sd in state_dicts:
        for key, value in sd.items():
            new = lpips_torch_key(key)
            if new is not None:
                if hasattr(value, "detach"):
                    value = value.detach().cpu().numpy()
                merged[new] = np.asarray(value)
    target = jax.eval_shape(
        lambda: LPIPS().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)))
    )["params"]
    return {"params": torch_to_flax(merged, target, source=source)}


def _read_state_dict(path: str) -> dict:
    if not os.path.exists(path):
        raise WeightsError(f"LPIPS weight file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return {k: v.numpy() for k, v in sd.items()}


def load_lpips_params(vgg_path: str, lin_path: str | None = None) -> dict:
    """Load published LPIPS weights: torchvision ``vgg16-397923af.pth`` (or any file with VGG16
    ``features`` / lpips ``net`` keys, .pth or .safetensors) plus lpips' ``weights/v0.1/vgg.pth``.

    ``lin_path=None`` uses the heads shipped inside the installed ``lpips`` package.
    """
    if lin_path is None:
        import importlib.util

        # find_spec, not import: importing lpips needs torchvision.
        spec = importlib.util.find_spec("lpips")
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError("lin_path not given and the lpips package (which ships vgg.pth) is absent")
        lin_path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
    return lpips_params_from_torch(_read_state_dict(vgg_path), _read_state_dict(lin_path),
                                   source=f"{vgg_path} + {lin_path}")
