"""A network's config as given to its ``*_from_config``: a mapping, a ``config.json`` or its folder."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

__all__ = ["read_model_config"]


def read_model_config(config: Mapping[str, Any] | str | os.PathLike) -> dict:
    """``config`` as a dict: a mapping as is, a path read as JSON (a folder: its ``config.json``)."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return dict(config)
