"""Paths on local disk or in cloud storage (``gs://``, ``s3://``): one place for reading and writing them.

Everything that takes a path (training workdirs, checkpoints, cached latents, TensorBoard logs,
``config.json``, frozen weights, tokenizers, evaluation output) goes through ``etils.epath`` (orbax's
own path type), so a ``gs://bucket/run`` works where ``runs/tiny`` does. Cloud objects need the
``gcsfs`` package (fsspec); ``STORAGE_EMULATOR_HOST`` points it at an emulator. Writes are atomic:
a local file is written beside its name and renamed, an object is uploaded whole. Libraries that
only open local files (the tokenizer, ArrayRecord readers) get a local copy: :func:`local_copy`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any

from etils import epath

__all__ = ["Path", "path", "is_remote", "looks_like_hub_id", "join", "exists", "isdir", "isfile", "listdir", "glob", "read_range", "open_binary", "makedirs", "read_bytes",
           "read_text", "read_json", "write_bytes", "write_text", "write_json", "remove", "copy_file", "copytree",
           "local_copy", "CACHE_DIR", "StorageError"]

Path = epath.Path
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "remote")

# gcsfs logs a warning where it cannot ask a bucket for its type (emulators, no credentials) and a
# traceback when it runs out of retries; the StorageError raised here says it in one line
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


class StorageError(OSError):
    """A path that cannot be reached or read (an unreachable bucket, a missing object)."""


def looks_like_hub_id(p: str) -> bool:
    """``owner/name`` (a model hub id): not absolute, no leading ``.``, exactly one ``/``."""
    return not (os.path.isabs(p) or p.startswith(".") or p.count("/") != 1)


def is_remote(p: Any) -> bool:
    return os.fspath(p).startswith(REMOTE_SCHEMES)


def path(p: Any) -> epath.Path:
    """An ``epath.Path`` for a local path (made absolute) or a cloud URL."""
    return epath.Path(p) if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def join(p: Any, *parts: str) -> str:
    """``p/part/...`` as a string, for local paths and URLs alike."""
    return os.fspath(epath.Path(p).joinpath(*parts)) if is_remote(p) else os.path.join(os.fspath(p), *parts)


def _guard(what: str, p: Any, fn):
    try:
        return fn()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        raise
    except OSError as e:
        hint = " (is the bucket reachable?)" if is_remote(p) else ""
        raise StorageError(f"cannot {what} {os.fspath(p)!r}{hint}: {type(e).__name__}: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - network clients raise their own types (aiohttp, google.auth)
        if not is_remote(p):
            raise
        raise StorageError(f"cannot {what} {os.fspath(p)!r} (is the bucket reachable?): {type(e).__name__}: "
                           f"{_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _fresh(p: Any) -> epath.Path:
    """``path(p)``, with the cloud client's cached listings of ``p`` dropped: other processes (the
    other hosts, a training run beside a sampler) write to the same bucket, and a listing cached
    before their write would hide it for the life of this process."""
    q = path(p)
    if is_remote(p):
        fs = getattr(getattr(q, "_backend", None), "fs", None)
        if fs is not None:
            fs(os.fspath(q)).invalidate_cache(os.fspath(q))
    return q


def exists(p: Any) -> bool:
    return _guard("reach", p, lambda: _fresh(p).exists())


def isdir(p: Any) -> bool:
    return _guard("reach", p, lambda: _fresh(p).is_dir())


def isfile(p: Any) -> bool:
    return _guard("reach", p, lambda: _fresh(p).is_file())


def listdir(p: Any) -> list[str]:
    """Names in directory ``p`` (sorted); ``[]`` when it does not exist."""
    def ls():
        q = _fresh(p)
        return sorted(c.name for c in q.iterdir()) if q.is_dir() else []

    return _guard("list", p, ls)


def glob(pattern: Any) -> list[str]:
    """Paths matching ``pattern`` (``*``, ``?``, ``[...]`` in any component), sorted."""
    pattern = os.fspath(pattern)
    if not is_remote(pattern):
        import glob as glob_lib

        return sorted(glob_lib.glob(pattern))
    scheme, _, rest = pattern.partition("://")
    bucket, _, key = rest.partition("/")
    root = _fresh(f"{scheme}://{bucket}")
    return _guard("list", pattern, lambda: sorted(os.fspath(q) for q in root.glob(key)))


def read_range(p: Any, offset: int, size: int) -> bytes:
    """``size`` bytes of file ``p`` from ``offset``: one ranged request for an object, ``pread``
    for a local file. Safe to call from many threads at once."""
    if not is_remote(p):
        fd = os.open(os.fspath(p), os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)
    q = path(p)
    return _guard("read", p, lambda: q._backend.fs(os.fspath(q)).cat_file(os.fspath(q), offset, offset + size))


def open_binary(p: Any):
    """A seekable binary file object for reading ``p`` (objects are read in ranged blocks)."""
    return _guard("open", p, lambda: path(p).open("rb"))


def makedirs(p: Any) -> None:
    """Create directory ``p`` with its parents (cloud storage has no directories: nothing to do)."""
    if not is_remote(p):
        os.makedirs(os.fspath(p), exist_ok=True)


def read_bytes(p: Any) -> bytes:
    return _guard("read", p, lambda: _fresh(p).read_bytes())


def read_text(p: Any) -> str:
    return read_bytes(p).decode("utf-8")


def read_json(p: Any) -> Any:
    return json.loads(read_text(p))


def write_bytes(p: Any, data: bytes) -> None:
    """Atomic: readers see the old content or the new one, never part of it."""
    if is_remote(p):
        _guard("write", p, lambda: path(p).write_bytes(data))  # one object upload
        return
    local = os.fspath(p)
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, local)


def write_text(p: Any, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def write_json(p: Any, obj: Any, **kw) -> None:
    write_text(p, json.dumps(obj, indent=2, **kw) + "\n")


def remove(p: Any) -> None:
    """Delete file ``p`` if it exists."""
    q = path(p)
    if _guard("reach", p, q.exists):
        _guard("delete", p, q.unlink)


def copy_file(src: Any, dst: Any) -> None:
    """Copy one file between any two locations (atomic at the destination)."""
    if not is_remote(src) and not is_remote(dst):
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(dst))), exist_ok=True)
        tmp = f"{os.fspath(dst)}.tmp"
        shutil.copyfile(os.fspath(src), tmp)
        os.replace(tmp, os.fspath(dst))
        return
    write_bytes(dst, read_bytes(src))


def copytree(src: Any, dst: Any) -> None:
    """Copy the files of directory ``src`` (recursively) to ``dst``."""
    for name in listdir(src):
        s, d = join(src, name), join(dst, name)
        if isdir(s):
            copytree(s, d)
        else:
            copy_file(s, d)


def local_copy(p: Any, cache_dir: str | None = None) -> str:
    """A local path holding ``p``: ``p`` itself when local, else a copy (file or directory) under
    ``cache_dir`` (default ``~/.cache/ldm_jax/remote``), downloaded once per URL (a file again when
    its size changed)."""
    if not is_remote(p):
        return os.fspath(p)
    url = os.fspath(p)
    key = hashlib.sha1(url.encode()).hexdigest()[:16]
    dst = os.path.join(cache_dir or CACHE_DIR, key, os.path.basename(url.rstrip("/")) or "root")
    if isdir(url):
        _download_tree(url, dst)
    else:
        _download_file(url, dst)
    return dst


def _size(url: str) -> int:
    return int(_guard("reach", url, lambda: path(url).stat().length))


def _download_file(url: str, dst: str) -> None:
    if os.path.exists(dst) and os.path.getsize(dst) == _size(url):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst))
    with os.fdopen(fd, "wb") as f:
        f.write(read_bytes(url))
    os.replace(tmp, dst)


def _download_tree(url: str, dst: str) -> None:
    for name in listdir(url):
        s = join(url, name)
        if isdir(s):
            _download_tree(s, os.path.join(dst, name))
        else:
            _download_file(s, os.path.join(dst, name))
