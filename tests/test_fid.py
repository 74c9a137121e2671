"""FID InceptionV3 in Flax against pytorch-fid's network (random weights) and its FID formula."""
import contextlib
import warnings

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_jax.convert.torch_flax import WeightsError
from ldm_jax.eval import inception as inc
from ldm_jax.eval.fid import feature_statistics, fid_from_features, frechet_distance, trace_sqrt_product
from ldm_jax.eval.inception import (InceptionV3FID, inception_features, inception_params_from_torch,
                                    load_inception, resize_bilinear)
from reference_pkgs import import_pytorch_fid


def _random_state_dict(pi, seed=0):
    """The weight-file layout (torchvision Inception3, 1008 classes, no aux) with every tensor random.

    He-scaled convs and BN stats/affines near 1 keep the features O(1) through all ~94 convs.
    """
    g = torch.Generator().manual_seed(seed)
    sd = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith("num_batches_tracked"):
                continue
            if v.ndim == 4:
                v.normal_(0, (2.0 / v[0].numel()) ** 0.5, generator=g)
            elif k.endswith(("running_var", "bn.weight")):
                v.uniform_(0.5, 1.5, generator=g)
            else:  # running_mean, bn.bias, fc
                v.normal_(0, 0.2, generator=g)
    return sd


@contextlib.contextmanager
def _torch_single_thread():
    """Torch's 2-thread CPU convs run ~20x slower on a busy 2-core machine (spinning workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pytorch_fid():
    return import_pytorch_fid()


@pytest.fixture(scope="module")
def state_dict(pytorch_fid):
    return _random_state_dict(pytorch_fid.inception)


@pytest.fixture(scope="module")
def variables(state_dict):
    return inception_params_from_torch(state_dict)


@pytest.fixture(scope="module")
def images():
    """uint8-valued float images in [0, 1]: two 64x64, one non-square 50x83, one 299x299."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (n, h, w, 3)).astype(np.float32) / 255
            for n, h, w in ((2, 64, 64), (1, 50, 83), (1, 299, 299))]


@pytest.fixture(scope="module")
def reference_features(pytorch_fid, state_dict, images):
    """pytorch_fid.inception.InceptionV3() (resize + normalize on) with the random weights, [4, 2048]."""
    pi = pytorch_fid.inception
    pi.fid_inception_v3.__globals__["load_state_dict_from_url"] = lambda *a, **k: state_dict
    net = pi.InceptionV3([pi.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
    with torch.no_grad(), _torch_single_thread():
        return np.concatenate([net(torch.from_numpy(x).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
                               for x in images])


@pytest.fixture(scope="module")
def resized(images):
    """All test images at 299x299, resized by our bilinear resize (so one compiled network serves all)."""
    return np.concatenate([np.asarray(jax.jit(resize_bilinear, static_argnums=1)(x, (299, 299)))
                           for x in images])


@pytest.fixture(scope="module")
def one_batch_features(variables, resized):
    return inception_features(InceptionV3FID(), variables, resized, batch_size=len(resized))


def test_resize_matches_torch_interpolate():
    rng = np.random.default_rng(1)
    for h, w, out in ((64, 64, (299, 299)), (50, 83, (299, 299)), (400, 320, (299, 299)), (7, 5, (3, 11))):
        x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
        want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out, mode="bilinear",
                             align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(resize_bilinear(x, out)), want, rtol=0, atol=2e-6)


def test_features_match_pytorch_fid(one_batch_features, reference_features):
    """Every image goes through resize (64x64, 50x83 -> 299; 299 unchanged), [-1, 1], all blocks."""
    diff = np.abs(one_batch_features - reference_features).max()
    print(f"max |flax - pytorch_fid| = {diff:.3g} (features up to {np.abs(reference_features).max():.3g})")
    assert one_batch_features.shape == (4, 2048)
    assert diff <= 1e-4


def test_batches_padding_and_uint8_match_one_batch(variables, images, resized, one_batch_features):
    model = InceptionV3FID()
    # Batches of 3: the second (1 image) is zero-padded to 3.
    batched = inception_features(model, variables, resized, batch_size=3, progress=False)
    np.testing.assert_allclose(batched, one_batch_features, rtol=0, atol=1e-5)
    # uint8 input (the 299x299 image repeated) is divided by 255 like torchvision's ToTensor.
    u8 = np.repeat(np.round(images[2] * 255).astype(np.uint8), 3, axis=0)
    feats = inception_features(model, variables, u8, batch_size=3)
    np.testing.assert_allclose(feats, np.repeat(one_batch_features[3:], 3, axis=0), rtol=0, atol=1e-5)


def test_key_mapping_complete(state_dict, variables):
    flat = jax.tree_util.tree_leaves_with_path(variables)
    n_used = sum(1 for k in state_dict if not k.endswith("num_batches_tracked") and not k.startswith("fc."))
    assert len(flat) == n_used == 94 * 5  # 94 BasicConv2d x (conv.weight + 4 BN tensors)
    assert set(variables) == {"params", "batch_stats"}
    assert jax.tree.structure(inc._variable_shapes()) == jax.tree.structure(variables)
    np.testing.assert_array_equal(variables["params"]["Mixed_7b"]["branch3x3dbl_3a"]["conv"]["kernel"],
                                  state_dict["Mixed_7b.branch3x3dbl_3a.conv.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
                                  state_dict["Conv2d_1a_3x3.bn.running_var"].numpy())

    broken = dict(state_dict)
    del broken["Mixed_6b.branch7x7_2.conv.weight"]
    broken["Mixed_6b.branch7x7_9.conv.weight"] = state_dict["Mixed_6b.branch7x7_2.conv.weight"]
    broken["Mixed_5b.branch1x1.bn.running_mean"] = torch.zeros(3)
    with pytest.raises(WeightsError) as e:
        inception_params_from_torch(broken)
    msg = str(e.value)
    assert "1 missing key(s): Mixed_6b.branch7x7_2.conv.weight" in msg
    assert "1 unexpected key(s): Mixed_6b.branch7x7_9.conv.weight" in msg
    assert "Mixed_5b.branch1x1.bn.running_mean: file (3,)" in msg


def test_load_inception_files(tmp_path, monkeypatch, state_dict, variables):
    monkeypatch.setenv("LDM_JAX_INCEPTION", str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="absent.pth.*pytorch-fid/releases/download"):
        load_inception()
    monkeypatch.delenv("LDM_JAX_INCEPTION")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert inc.default_inception_path() == str(tmp_path / ".cache/ldm_jax/pt_inception-2015-12-05-6726825d.pth")

    for name in ("bad.pth", "bad.safetensors", "bad.npz"):
        (tmp_path / name).write_bytes(b"not a weight file" * 10)
        with pytest.raises(WeightsError, match=f"cannot read Inception weights from .*{name}"):
            load_inception(str(tmp_path / name))

    pth, npz = tmp_path / "w.pth", tmp_path / "w.npz"
    torch.save(state_dict, pth)
    np.savez(npz, **{k: v.numpy() for k, v in state_dict.items()})
    for path in (pth, npz):
        model, loaded = load_inception(str(path))
        assert isinstance(model, InceptionV3FID)
        jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_download_checks_hash(tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    monkeypatch.setattr(inc, "FID_WEIGHTS_URL", src.as_uri().replace("src.bin", "w-deadbeef.pth"))
    (tmp_path / "w-deadbeef.pth").write_bytes(b"weights")  # sha256 does not start with deadbeef
    with pytest.raises(WeightsError, match="corrupt"):
        load_inception(str(tmp_path / "dl" / "w.pth"), download=True)
    assert not (tmp_path / "dl" / "w.pth").exists()


def test_frechet_distance_matches_pytorch_fid(pytorch_fid):
    ref = pytorch_fid.fid_score.calculate_frechet_distance
    rng = np.random.default_rng(2)
    a = rng.standard_normal((200, 16))
    b = 0.8 * rng.standard_normal((150, 16)) @ rng.standard_normal((16, 16)) * 0.3 + 0.5
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    np.testing.assert_allclose(mu1, a.mean(0))
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid passes sqrtm(disp=False)
        want = ref(mu1, s1, mu2, s2)
        # Fewer samples than dimensions: singular covariances, the eps fallback path.
        c, d = rng.standard_normal((5, 16)), rng.standard_normal((6, 16))
        want_singular = ref(*feature_statistics(c), *feature_statistics(d))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    assert fid_from_features(a, b) == pytest.approx(want, rel=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert fid_from_features(c, d) == pytest.approx(want_singular, rel=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)


def test_trace_sqrt_product_equals_sqrtm_trace():
    from scipy import linalg

    rng = np.random.default_rng(3)
    _, s1 = feature_statistics(rng.standard_normal((300, 12)))
    _, s2 = feature_statistics(rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12)))
    want = np.trace(linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(want, rel=1e-9)


def test_fid_with_fewer_samples_than_dimensions_where_sqrtm_fails(pytorch_fid):
    # 64 samples of 128-d features at the demo classifier's scale: sqrtm(S1 S2) of the rank-deficient
    # product has an imaginary diagonal above pytorch-fid's 1e-3 tolerance, and it raises.
    rng = np.random.default_rng(0)
    a = 50 * rng.standard_normal((64, 128))
    b = 50 * rng.standard_normal((64, 128)) * 0.7 + 0.3
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="Imaginary component"):
        warnings.simplefilter("ignore")
        pytorch_fid.fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    # Independent form: Tr((S1 S2)^1/2) is the sum of the square roots of S1 S2's (real, >= 0) eigenvalues.
    eig = np.clip(np.linalg.eigvals(s1 @ s2).real, 0.0, None)
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    with pytest.warns(RuntimeWarning, match="imaginary component"):
        got = fid_from_features(a, b)
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-6)
