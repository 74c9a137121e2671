"""pytorch-fid's FID InceptionV3 (``fid_inception_v3``, pool3 features) in Flax, NHWC.

The network is ``pytorch_fid.inception.InceptionV3(output_blocks=[3], resize_input=True,
normalize_input=True)``: bilinear resize to 299x299 (``align_corners=False``, no antialias),
[0, 1] -> [-1, 1], torchvision's Inception3 stem with the FID-patched blocks (FIDInceptionA/C/E_1
average-pool without counting padding, FIDInceptionE_2 max-pools), global average pool -> 2048-d.

The parameter tree mirrors the torchvision module names of pytorch-fid's weight file
``pt_inception-2015-12-05-6726825d.pth``: ``Mixed_5b.branch5x5_1.conv.weight`` ->
``params['Mixed_5b']['branch5x5_1']['conv']['kernel']``, the BN running statistics go to the
``batch_stats`` collection (``bn.running_mean`` -> ``['bn']['mean']``). The classifier ``fc.*``
is not part of the feature extractor and is dropped.

Matmul/conv precision follows ``jax_default_matmul_precision`` (on GPUs both JAX and PyTorch
default to TF32 convolutions; set it to ``"highest"`` for float32-exact features).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from ldm_jax.convert.torch_flax import WeightsError

__all__ = [
    "FID_WEIGHTS_URL",
    "FEATURE_DIM",
    "InceptionV3FID",
    "inception_params_from_torch",
    "load_inception",
    "default_inception_path",
    "inception_features",
    "resize_bilinear",
]

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FEATURE_DIM = 2048
_INPUT_SIZE = 299
_ENV_VAR = "LDM_JAX_INCEPTION"


# ----------------------------------------------------------------------------- network


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """torchvision ``BasicConv2d``: conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU."""

    features: int
    kernel_size: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), _pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _max_pool_3x3(x, stride: int, padding: int = 0):
    # PyTorch max-pool padding is -inf, as flax's.
    return nn.max_pool(x, (3, 3), (stride, stride), ((padding, padding),) * 2)


def _avg_pool_3x3_no_pad_count(x):
    """``F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)`` (the FID patch)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1 (64+64+96+pool_features)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (stride-2 reduction): 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2 (384+96+C_in)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..e: factorised 7x7 branches, 4 x 192 = 768 channels out."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (stride-2 reduction): 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2 (320+192+C_in)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (``pool='avg'``, FIDInceptionE_1) / Mixed_7c (``pool='max'``, FIDInceptionE_2); 2048 out."""

    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _avg_pool_3x3_no_pad_count(x) if self.pool == "avg" else _max_pool_3x3(x, 1, padding=1)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _bilinear_taps(in_size: int, out_size: int):
    """Source indices and weights of PyTorch's ``bilinear``, ``align_corners=False`` (float32 math)."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    # PyTorch's compiled kernel fuses scale * dst - 0.5 into one FMA (a single rounding): the
    # float64 product is exact, so rounding the float64 result once to float32 reproduces it.
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))  # PyTorch clamps negative source coordinates to 0
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, (np.float32(1) - w1), w1


def resize_bilinear(x, size: tuple[int, int]):
    """``F.interpolate(x, size, mode='bilinear', align_corners=False)`` for NHWC ``x`` (no antialias)."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    # Width first, then height: PyTorch's CPU kernel computes h0*(w0*a + w1*b) + h1*(w0*c + w1*d).
    i0, i1, a, b = _bilinear_taps(w, size[1])
    x = x[:, :, i0] * a[:, None] + x[:, :, i1] * b[:, None]
    i0, i1, a, b = _bilinear_taps(h, size[0])
    return x[:, i0] * a[:, None, None] + x[:, i1] * b[:, None, None]


class InceptionV3FID(nn.Module):
    """FID InceptionV3 pool3 features: ``apply(variables, images)``, images float [N, H, W, 3] in
    [0, 1] -> float32 [N, 2048].

    ``resize_input``/``normalize_input`` as in pytorch-fid (both on for FID); with
    ``resize_input=False`` the input must be at least 75x75.
    """

    resize_input: bool = True
    normalize_input: bool = True

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images [N, H, W, 3], got shape {images.shape}")
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, (_INPUT_SIZE, _INPUT_SIZE))
        if self.normalize_input:
            x = 2 * x - 1
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE("avg", name="Mixed_7b")(x)
        x = FIDInceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------- weights

# BasicConv2d tensor -> (Flax collection, leaf name).
_LEAVES = {
    "conv.weight": ("params", "kernel"),
    "bn.weight": ("params", "scale"),
    "bn.bias": ("params", "bias"),
    "bn.running_mean": ("batch_stats", "mean"),
    "bn.running_var": ("batch_stats", "var"),
}
# In the weight file but not in the feature extractor.
_DROPPED = re.compile(r"^fc\.(weight|bias)$|\.num_batches_tracked$")


@functools.lru_cache(maxsize=None)
def _variable_shapes() -> dict:
    model = InceptionV3FID(resize_input=False)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3))))


def inception_params_from_torch(state_dict: Mapping[str, Any], *, source: str = "Inception state dict") -> dict:
    """pytorch-fid's (torchvision ``Inception3`` layout) state dict -> Flax variables.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays, for ``InceptionV3FID().apply``.
    Raises:
      WeightsError: naming every missing/unexpected key and shape mismatch.
    """
    target = traverse_util.flatten_dict(_variable_shapes())
    out, unexpected, mismatched, bad_shape = {}, [], [], set()
    for key, value in state_dict.items():
        if _DROPPED.search(key):
            continue
        prefix, _, tail = key.rpartition(".")
        module, _, kind = prefix.rpartition(".")
        collection, leaf = _LEAVES.get(f"{kind}.{tail}", (None, None))
        path = (collection, *module.split("."), kind, leaf)
        if collection is None or path not in target:
            unexpected.append(key)
            continue
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        arr = np.asarray(value, dtype=np.float32)
        if leaf == "kernel" and arr.ndim == 4:
            arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        want = tuple(target[path].shape)
        if arr.shape != want:
            mismatched.append(f"{key}: file {tuple(np.shape(value))}, model expects {want}")
            bad_shape.add(path)
            continue
        out[path] = arr
    missing = [_torch_key(p) for p in target if p not in out and p not in bad_shape]
    problems = [f"{len(v)} {what}: {_preview(v)}" for what, v in
                (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                 ("shape mismatch(es)", mismatched)) if v]
    if problems:
        raise WeightsError(f"{source} does not fit the FID InceptionV3: " + "; ".join(problems))
    return traverse_util.unflatten_dict(out)


def _torch_key(path: tuple[str, ...]) -> str:
    """Inverse of the mapping: ``('batch_stats', ..., 'bn', 'mean')`` -> ``'....bn.running_mean'``."""
    collection, *module, kind, leaf = path
    torch_name = next(k for k, v in _LEAVES.items() if v == (collection, leaf))
    return ".".join([*module, torch_name])


def _preview(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def default_inception_path() -> str:
    """``$LDM_JAX_INCEPTION`` if set, else ``~/.cache/ldm_jax/pt_inception-2015-12-05-6726825d.pth``."""
    return os.environ.get(_ENV_VAR) or os.path.join(
        os.path.expanduser("~"), ".cache", "ldm_jax", os.path.basename(FID_WEIGHTS_URL))


def _read_state_dict(path: str) -> dict:
    """.pth (needs torch), .safetensors or .npz -> {key: array}; WeightsError if unreadable."""
    lower = path.lower()
    try:
        if lower.endswith(".safetensors"):
            from safetensors.numpy import load_file

            return dict(load_file(path))
        if lower.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        try:
            import torch
        except ImportError as e:
            raise WeightsError(
                f"reading the PyTorch file {path} needs torch (pip install torch); or convert it once "
                "to .safetensors/.npz with the same keys, which load without torch") from e
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as e:  # each reader raises its own types for truncated/corrupt files
        raise WeightsError(f"cannot read Inception weights from {path} (corrupt or not a weight file?): "
                           f"{type(e).__name__}: {e}. Re-download {FID_WEIGHTS_URL}") from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in sd.items()}


def _download(url: str, dest: str) -> None:
    """Fetch ``url`` to ``dest`` atomically, checking the sha256 prefix in its name (torch.hub style)."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url) as r:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        m = re.search(r"-([0-9a-f]{8,})\.[^./]+$", url)
        if m and not digest.hexdigest().startswith(m.group(1)):
            raise WeightsError(f"download of {url} is corrupt: sha256 {digest.hexdigest()[:16]}... "
                               f"does not start with {m.group(1)}")
        shutil.move(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_inception(path: str | None = None, *, download: bool = False) -> tuple[InceptionV3FID, dict]:
    """Load pytorch-fid's FID Inception weights -> ``(model, variables)``.

    Args:
      path: ``pt_inception-2015-12-05-6726825d.pth`` (read with torch) or a ``.safetensors``/``.npz``
        with the same keys. None: :func:`default_inception_path`.
      download: fetch :data:`FID_WEIGHTS_URL` to ``path`` when the file is missing.
    Raises:
      FileNotFoundError: the file is missing (says where to get it and where to put it).
      WeightsError: unreadable/corrupt file or wrong keys/shapes.
    """
    path = os.path.expanduser(path) if path is not None else default_inception_path()
    if not os.path.isfile(path):
        if not download:
            raise FileNotFoundError(
                f"FID Inception weights not found at {path}. Download pytorch-fid's weights from "
                f"{FID_WEIGHTS_URL} and put the file there (or set ${_ENV_VAR} to its path, or pass "
                "download=True).")
        _download(FID_WEIGHTS_URL, path)
    variables = inception_params_from_torch(_read_state_dict(path), source=path)
    return InceptionV3FID(), variables


# ----------------------------------------------------------------------------- extraction


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: InceptionV3FID, variables, images):
    return model.apply(variables, images)


def inception_features(model: InceptionV3FID, params, images, batch_size: int = 50, *,
                       progress: bool | None = None) -> np.ndarray:
    """Pool3 features of ``images`` in batches -> float32 numpy [N, 2048].

    Args:
      model, params: from :func:`load_inception`.
      images: uint8 [N, H, W, 3] (0..255), or float [N, H, W, 3] in [0, 1]; any array indexable by
        slices (a ``np.memmap`` is read one batch at a time).
      batch_size: images per device call; the last batch is zero-padded so one program serves all.
      progress: show a tqdm bar; None shows it when there is more than one batch.
    """
    n = len(images)
    if n == 0:
        return np.zeros((0, FEATURE_DIM), np.float32)
    if np.ndim(images[:1]) != 4 or np.shape(images[:1])[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {np.shape(images)}")
    bs = max(1, min(int(batch_size), n))
    params = jax.device_put(params)  # once, not with every batch
    out = np.empty((n, FEATURE_DIM), np.float32)
    bar = tqdm(total=n, desc="Inception features", unit="img",
               disable=not (progress if progress is not None else n > bs))
    pending = None  # (start, count, device features): one batch in flight while the next is read
    for start in range(0, n, bs):
        batch = np.asarray(images[start:start + bs])
        count = len(batch)
        if count < bs:
            batch = np.concatenate([batch, np.zeros((bs - count, *batch.shape[1:]), batch.dtype)])
        feats = _apply(model, params, _to_unit_float(batch))
        if pending is not None:
            _collect(out, bar, *pending)
        pending = (start, count, feats)
    _collect(out, bar, *pending)
    bar.close()
    return out


def _to_unit_float(batch: np.ndarray) -> np.ndarray:
    if np.issubdtype(batch.dtype, np.integer):
        return batch.astype(np.float32) / np.float32(255)  # torchvision ToTensor: uint8 / 255
    return batch.astype(np.float32, copy=False)


def _collect(out, bar, start, count, feats):
    out[start:start + count] = np.asarray(feats)[:count]
    bar.update(count)
