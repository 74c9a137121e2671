"""LPIPS-VGG in Flax against the ``lpips`` package (random VGG backbone, random and published heads)."""
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from ldm_jax.convert.lpips import load_lpips_params, lpips_params_from_torch
from ldm_jax.convert.torch_flax import WeightsError
from ldm_jax.models.lpips import LPIPS


def _vgg16_features():
    """torchvision's exact VGG16 ``features`` Sequential (configuration "D", same indices)."""
    layers, c_in = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(tnn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [tnn.Conv2d(c_in, v, kernel_size=3, padding=1), tnn.ReLU(inplace=True)]
            c_in = v
    return tnn.Sequential(*layers)


def _install_torchvision_shim():
    """A minimal ``torchvision.models.vgg16`` so ``lpips`` imports without the (broken) real package."""
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "_ldm_jax_shim"):
        return

    class _VGG(tnn.Module):
        def __init__(self):
            super().__init__()
            self.features = _vgg16_features()

    def vgg16(pretrained=False, weights=None, **kwargs):
        if pretrained or weights is not None:
            raise RuntimeError("the torchvision test shim has no pretrained weights")
        return _VGG()

    def _missing(*args, **kwargs):
        raise RuntimeError("not provided by the torchvision test shim")

    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.vgg16 = vgg16
    models.alexnet = models.squeezenet1_1 = models.resnet18 = _missing
    tv.models = models
    tv._ldm_jax_shim = True
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.models"] = models


@pytest.fixture(scope="module")
def reference():
    _install_torchvision_shim()
    import lpips

    torch.manual_seed(0)
    model = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=False, verbose=False).eval()
    # Random backbone (He-like scale keeps activations O(1) through 13 convs) and random positive heads.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("net."):
                fan_in = p[0].numel() if p.ndim == 4 else 1
                p.normal_(0, (2.0 / fan_in) ** 0.5 if p.ndim == 4 else 0.05)
            else:
                p.uniform_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (2, 3, 40, 48)).astype(np.float32)  # non-square, odd sizes after pooling
    x1 = np.clip(x0 + 0.3 * rng.standard_normal(x0.shape), -1, 1).astype(np.float32)
    return x0, x1


def _nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _run(params, x0, x1):
    return np.asarray(jax.jit(LPIPS().apply)(params, _nhwc(x0), _nhwc(x1)))


def test_matches_lpips_package(reference, images):
    x0, x1 = images
    params = lpips_params_from_torch(reference.state_dict(), source="lpips.LPIPS state dict")
    with torch.no_grad():
        want = reference(torch.from_numpy(x0), torch.from_numpy(x1)).numpy().reshape(-1)
    got = _run(params, x0, x1)
    assert got.shape == (2,)
    assert np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # identical images are at distance 0
    np.testing.assert_allclose(_run(params, x0, x0), 0.0, atol=1e-6)


def test_torchvision_layout_and_published_heads(reference, images, tmp_path):
    """The user's files: torchvision vgg16 state dict (features.N + classifier) and lpips' vgg.pth."""
    import lpips

    x0, x1 = images
    heads_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)
    assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
    published = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=False, verbose=False).eval()
    published.load_state_dict(reference.state_dict())
    published.load_state_dict(heads, strict=False)

    tv_sd = {}
    for name, p in reference.net.named_parameters():  # net.sliceK.N.weight -> features.N.weight
        _, idx, leaf = name.split(".")
        tv_sd[f"features.{idx}.{leaf}"] = p.detach().clone()
    tv_sd["classifier.0.weight"] = torch.zeros(4, 4)  # ignored
    vgg_path = str(tmp_path / "vgg16.pth")
    torch.save(tv_sd, vgg_path)
    params = load_lpips_params(vgg_path)  # heads from the installed lpips package
    with torch.no_grad():
        want = published(torch.from_numpy(x0), torch.from_numpy(x1)).numpy().reshape(-1)
    np.testing.assert_allclose(_run(params, x0, x1), want, rtol=0, atol=1e-4)


def test_gradient_finite_and_errors(reference, images):
    params = lpips_params_from_torch(reference.state_dict())
    x0, _ = images
    x = _nhwc(x0)[:1, :16, :16]
    # Zero image: ReLU features vanish somewhere, so the unit normalisation must have a safe gradient.
    g = jax.grad(lambda y: LPIPS().apply(params, y, jnp.zeros_like(y)).sum())(x)
    assert np.all(np.isfinite(np.asarray(g)))
    with pytest.raises(WeightsError, match="missing"):
        lpips_params_from_torch({k: v for k, v in reference.state_dict().items() if "lin4" not in k})
    with pytest.raises(ValueError, match="NHWC"):
        LPIPS().apply(params, x, x[:, :8])
