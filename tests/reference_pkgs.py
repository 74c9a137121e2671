"""Import reference packages installed with ``pip --no-deps --target .venv/reference_pkgs`` (see Makefile).

PyPI's torchvision does not import beside the local CPU torch (its compiled ops are missing), but its
pure-Python models do once ``torchvision._meta_registrations`` (which registers those ops) is stubbed.
"""
import os
import sys
import types

import pytest

REFERENCE_DIR = os.path.join(sys.prefix, "reference_pkgs")


def import_pytorch_fid():
    """Return ``pytorch_fid`` (with ``.inception`` and ``.fid_score`` loaded) on the real torchvision.

    Skips the calling test if ``.venv/reference_pkgs`` is missing. A torchvision stand-in left in
    ``sys.modules`` by another test (tests/test_lpips.py) is set aside while importing and restored.
    """
    if not os.path.isdir(os.path.join(REFERENCE_DIR, "pytorch_fid")):
        pytest.skip(f"pytorch-fid reference not installed in {REFERENCE_DIR}; run: "
                    f"{sys.executable} -m pip install -q --no-deps --target {REFERENCE_DIR} "
                    "torchvision==0.28.0 pytorch-fid==0.3.0")
    if REFERENCE_DIR not in sys.path:
        sys.path.append(REFERENCE_DIR)
    stand_in = {}
    tv = sys.modules.get("torchvision")
    if tv is not None and not hasattr(tv, "__file__"):  # a stub module, not the package
        stand_in = {k: sys.modules.pop(k) for k in list(sys.modules)
                    if k == "torchvision" or k.startswith("torchvision.")}
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    try:
        import torchvision  # noqa: F401
        import pytorch_fid.fid_score  # noqa: F401
        import pytorch_fid.inception  # noqa: F401
    finally:
        if stand_in:
            for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
                if k != "torchvision._meta_registrations":
                    del sys.modules[k]
            sys.modules.update(stand_in)
    return sys.modules["pytorch_fid"]
