"""Configs: Python modules with ``get_config()`` returning an ``ml_collections.ConfigDict``.

``load_config("tiny_train", ["--config.train.lr=1e-4"])`` loads the packaged recipe
``ldm_jax/configs/tiny_train.py`` (or any ``.py`` file given by path) and applies command-line
overrides (``--config.a.b=value``; values parsed as Python literals, falling back to strings, and
checked against the existing field's type by ConfigDict).
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Iterable

import ml_collections


def config_names() -> list[str]:
    """The packaged recipes (``ldm_jax/configs/*.py``), by name."""
    import pkgutil

    import ldm_jax.configs

    return sorted(m.name for m in pkgutil.iter_modules(ldm_jax.configs.__path__) if m.name != "common")


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Load a config and apply ``overrides``.

    ``path``: a packaged recipe's name (``sd_v1_train``, see :func:`config_names`) or a ``.py``
    file with ``get_config(arg=None)``; either may end in ``:arg`` to pass a string argument to
    ``get_config`` (big_vision style, e.g. ``tiny_autoencoder:vq``).
    """
    arg = None
    if ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if os.path.isfile(path):
        spec = importlib.util.spec_from_file_location(f"ldm_jax_config_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif path in config_names():
        module = importlib.import_module(f"ldm_jax.configs.{path}")
    else:
        raise FileNotFoundError(f"config {path!r} is neither a file nor a packaged recipe "
                                f"({', '.join(config_names())})")
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config()")
    config = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    apply_overrides(config, overrides)
    return config


def parse_value(text: str):
    """``'1e-4'`` -> 1e-4, ``'(256, 512)'`` -> (256, 512), ``'true'`` -> True, ``'abc'`` -> ``'abc'``."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Apply ``--config.a.b=value`` (or ``a.b=value``) strings to ``config`` in place."""
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form --config.key=value")
        if key.startswith("config."):
            key = key[len("config."):]
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            if name not in node:
                raise KeyError(f"override {item!r}: config has no field {name!r}")
            node = node[name]
        if isinstance(node, ml_collections.ConfigDict) and leaf not in node:
            raise KeyError(f"override {item!r}: config has no field {key!r}")
        new = parse_value(value)
        old = node[leaf]
        if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
            new = float(new)
        if isinstance(old, tuple) and isinstance(new, list):
            new = tuple(new)
        if isinstance(node, ml_collections.ConfigDict):
            setattr(node, leaf, new)
        else:
            node[leaf] = new
