"""Random-access image-caption sources: local folder, webdataset ``.tar`` shards, tfds by name.

Every source has ``len(source)`` and ``source[i] -> {"image": encoded bytes or uint8 [H,W,3] or
None (unreadable), "caption": str, ...}``, the ``grain`` random-access protocol; a source with
several captions per image adds ``"captions"`` (all of them), of which the pipeline uses one per
epoch. Decoding happens later in the pipeline, where a corrupt image is skipped and counted instead
of crashing.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from typing import Any, Sequence

import numpy as np

from ldm_jax import storage

__all__ = ["IMAGE_EXTENSIONS", "SOURCE_KINDS", "FolderSource", "TarShardSource", "TfdsSource", "shapes_source",
           "make_source", "source_from_spec"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_FILE_KEYS = ("file_name", "file", "image", "path", "filename")
_TEXT_KEYS = ("text", "caption", "captions", "prompt")


def _first_key(row: dict, keys: Sequence[str], what: str, where: str) -> Any:
    for k in keys:
        if k in row:
            return row[k]
    raise ValueError(f"{where}: no {what} column (expected one of {list(keys)}), got {sorted(row)}")


def _as_caption(value: Any) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        value = value[0] if len(value) else ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


class FolderSource:
    """Images under ``root`` (recursive) with one or several captions each.

    Captions come from, in this order:

    - ``captions_file``, else ``root/{captions,metadata}.{jsonl,csv}``: one row per image, the image
      in ``file_name``/``file``/``image``/``path``/``filename`` (relative to ``root``) and its
      captions in ``text``/``caption``/``captions``/``prompt``. A jsonl value may be a string or a
      list of strings; a csv may spread captions over numbered columns of one of those names
      (``caption_1,caption_2,...`` or ``text,text2,...``; empty cells ignored). A row naming a
      missing image is an error at construction;
    - ``captions_dir`` (relative to ``root`` or absolute): ``<captions_dir>/<rel>.txt`` for the image
      ``<images>/<rel>.<ext>``, where ``<images>`` is ``root/images`` when that folder exists, else
      ``root``. When neither a captions file nor ``captions_dir`` is given and ``root/images/`` and
      ``root/text/`` both exist (MM-CelebA-HQ, CUB and Oxford-102 captions), ``root/text`` is used.
      It is an error when no image has a caption file there (a layout mismatch, not missing captions);
    - else a ``.txt`` with the image's stem next to each image.

    With ``caption_lines`` (the default) every non-empty line of a ``.txt`` is one caption, as in the
    ten-captions-per-image datasets; without it the whole file is one caption (multi-line prose).
    Records are ``{"image", "caption": the first caption or "", "captions": all of them}``; the
    pipeline draws one of ``captions`` each time the example comes up
    (:class:`~ldm_jax.data.transforms.DrawCaption`). An image with no caption (missing or blank ``.txt``) gets ``""``, which the pipeline skips and
    counts when captions are required. Caption text that is not UTF-8 is an error naming the file.
    """

    def __init__(self, root: str | os.PathLike, captions_file: str | os.PathLike | None = None, *,
                 captions_dir: str | os.PathLike | None = None, caption_lines: bool = True):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise ValueError(f"FolderSource: {self.root!r} is not a directory")
        if captions_file is not None and captions_dir is not None:
            raise ValueError("FolderSource: give a captions file or a captions folder, not both")
        self.caption_lines = caption_lines
        if captions_file is None and captions_dir is None:
            for name in ("captions.jsonl", "metadata.jsonl", "captions.csv", "metadata.csv"):
                if os.path.exists(os.path.join(self.root, name)):
                    captions_file = os.path.join(self.root, name)
                    break
            else:
                if all(os.path.isdir(os.path.join(self.root, d)) for d in ("images", "text")):
                    captions_dir = "text"
        if captions_file is not None:
            self.items = self._read_captions_file(os.fspath(captions_file))
        elif captions_dir is not None:
            self.items = self._read_captions_dir(os.path.join(self.root, os.fspath(captions_dir)))
        else:
            self.items = [(path, self._read_txt(os.path.splitext(path)[0] + ".txt"))
                          for path in _walk_images(self.root)]
        if not self.items:
            raise ValueError(f"FolderSource: no images found under {self.root!r}")

    def _read_txt(self, path: str) -> tuple[str, ...]:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return ()
        text = _decode_utf8(raw, path)
        if self.caption_lines:
            return tuple(line.strip() for line in text.splitlines() if line.strip())
        return (text.strip(),) if text.strip() else ()

    def _read_captions_dir(self, captions_dir: str) -> list[tuple[str, tuple[str, ...]]]:
        if not os.path.isdir(captions_dir):
            raise ValueError(f"FolderSource: captions folder {captions_dir!r} is not a directory")
        images = os.path.join(self.root, "images")
        images = images if os.path.isdir(images) else self.root
        items, found, first = [], 0, None
        for path in _walk_images(images):
            txt = os.path.join(captions_dir, os.path.splitext(os.path.relpath(path, images))[0] + ".txt")
            found += os.path.exists(txt)
            first = first or txt
            items.append((path, self._read_txt(txt)))
        if items and not found:
            raise ValueError(f"FolderSource: no caption file in {captions_dir!r} matches an image under "
                             f"{images!r} (expected e.g. {first!r})")
        return items

    def _read_captions_file(self, path: str) -> list[tuple[str, tuple[str, ...]]]:
        if not path.endswith((".jsonl", ".csv")):
            raise ValueError(f"FolderSource: captions file must be .jsonl or .csv, got {path!r}")
        with open(path, "rb") as fh:
            text = _decode_utf8(fh.read(), path)
        rows: list[tuple[int, str, tuple[str, ...]]] = []  # (line, file, captions)
        if path.endswith(".jsonl"):
            for line_no, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"FolderSource: {path} line {line_no} is not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"FolderSource: {path} line {line_no} is not a JSON object")
                where = f"{path} line {line_no}"
                rows.append((line_no, _first_key(row, _FILE_KEYS, "file", where),
                             _as_captions(_first_key(row, _TEXT_KEYS, "caption", where), where)))
        else:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            columns = _caption_columns(reader.fieldnames or [], path)
            for row in reader:
                where = f"{path} line {reader.line_num}"
                rows.append((reader.line_num, _first_key(row, _FILE_KEYS, "file", where),
                             tuple(row[c].strip() for c in columns if row[c] and row[c].strip())))
        items = [(os.path.join(self.root, str(f)), caps) for _, f, caps in rows]
        missing = [(line_no, f) for (line_no, f, _), (p, _) in zip(rows, items) if not os.path.isfile(p)]
        if missing:
            # a mismatch between captions and images is a data-preparation bug: fail before training
            line_no, f = missing[0]
            raise ValueError(f"FolderSource: {path} line {line_no} names {f!r}, which is not a file under "
                             f"{self.root!r} ({len(missing)} of {len(rows)} rows name missing images)")
        return items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, captions = self.items[index]
        try:
            with open(path, "rb") as fh:
                image = fh.read()
        except OSError:
            image = None
        return {"image": image, "caption": captions[0] if captions else "", "captions": captions}

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, {len(self)} examples)"


def _walk_images(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def _decode_utf8(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: a BOM would otherwise start the first caption
    except UnicodeDecodeError as e:
        raise ValueError(f"FolderSource: {path!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                         f"{e.start}); re-encode it as UTF-8") from None


def _as_captions(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"FolderSource: {where}: a caption list must hold strings, got {value!r}")
        return tuple(v.strip() for v in value if v.strip())
    value = str(value).strip()
    return (value,) if value else ()


def _caption_columns(fieldnames: Sequence[str], path: str) -> list[str]:
    for key in _TEXT_KEYS:
        columns = [c for c in fieldnames if re.fullmatch(rf"{key}(_?\d+)?", c)]
        if columns:
            return columns
    raise ValueError(f"FolderSource: {path}: no caption column (expected one of {list(_TEXT_KEYS)}, optionally "
                     f"numbered), got {list(fieldnames)}")


class TarShardSource:
    """Webdataset-style uncompressed ``.tar`` shards: members ``<key>.<ext>`` grouped by key.

    An example is a key with an image member (``jpg``/``jpeg``/``png``/``webp``) and a caption from
    ``txt`` (or ``json`` with ``caption``/``text``; missing -> ``""``). Members are read by offset,
    so access is random and shards are indexed once at construction.
    """

    _IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike]):
        if isinstance(shards, (str, os.PathLike)):
            shards = storage.glob(shards) or [os.fspath(shards)]
        self.shards = [os.fspath(s) for s in shards]
        self.items: list[tuple[int, tuple[int, int] | None, tuple[str, int, int] | None]] = []
        for si, path in enumerate(self.shards):
            if not storage.isfile(path):
                raise ValueError(f"TarShardSource: shard {path!r} does not exist")
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with storage.open_binary(path) as fh:
                try:  # uncompressed only: members are read by offset
                    tar = tarfile.open(fileobj=fh, mode="r:")
                except tarfile.ReadError as e:
                    raise ValueError(f"TarShardSource: {path!r} is not an uncompressed tar file ({e})") from e
                for m in tar.getmembers():
                    if not m.isfile():
                        continue
                    dirname, base = os.path.split(m.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    groups.setdefault(os.path.join(dirname, stem), {})[ext.lower()] = m
            for key in sorted(groups):
                g = groups[key]
                img = next((g[e] for e in self._IMAGE_EXTS if e in g), None)
                if img is None:
                    continue
                cap = next(((e, g[e]) for e in ("txt", "caption", "json") if e in g), None)
                cap_ref = None if cap is None else (cap[0], cap[1].offset_data, cap[1].size)
                self.items.append((si, (img.offset_data, img.size), cap_ref))
        if not self.items:
            raise ValueError(f"TarShardSource: no image members found in {self.shards}")
        self._fds: dict[int, int] = {}

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        path = self.shards[shard]
        if storage.is_remote(path):  # one ranged request per member
            return storage.read_range(path, offset, size)
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(path, os.O_RDONLY)
        return os.pread(fd, size, offset)  # thread-safe: no shared file position

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        shard, (off, size), cap = self.items[index]
        caption = ""
        if cap is not None:
            ext, coff, csize = cap
            raw = self._read(shard, coff, csize).decode("utf-8", errors="replace")
            if ext == "json":
                try:
                    caption = _as_caption(_first_key(json.loads(raw), _TEXT_KEYS, "caption", "json member"))
                except (ValueError, TypeError):
                    caption = ""
            else:
                caption = raw.strip()
        return {"image": self._read(shard, off, size), "caption": caption}

    def __getstate__(self):  # file descriptors do not survive pickling (grain worker processes)
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __repr__(self) -> str:
        return f"TarShardSource({len(self.shards)} shards, {len(self)} examples)"


class TfdsSource:
    """Any prepared tfds dataset with an image and a text feature, read with ``tfds.data_source``.

    ``name`` may include a config (``"coco_captions/2017"``). ``image_key``/``caption_key`` default
    to the first ``Image``/``Text`` feature; nested keys use ``/`` (``"captions/text"``; a list of
    captions gives its first). The dataset must have been prepared with
    ``file_format="array_record"`` (no TensorFlow needed to read it). ``extra_keys`` are passed
    through as numpy values (e.g. the shapes labels).
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 image_key: str | None = None, caption_key: str | None = None,
                 extra_keys: Sequence[str] = ()):
        import tensorflow_datasets as tfds

        if name.split("/")[0] == "shapes_captions":
            import ldm_jax.data.shapes_captions  # noqa: F401  (registers the builder)
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
        features = builder.info.features
        flat = _flat_features(features)
        if image_key is None:
            image_key = next((k for k, f in flat.items() if isinstance(f, tfds.features.Image)), None)
        if caption_key is None:
            caption_key = next((k for k, f in flat.items() if isinstance(f, tfds.features.Text)), None)
        if image_key is None or caption_key is None:
            raise ValueError(f"TfdsSource: {name!r} needs an Image and a Text feature; features are "
                             f"{ {k: type(f).__name__ for k, f in flat.items()} }")
        for k in (image_key, caption_key, *extra_keys):
            if k not in flat:
                raise ValueError(f"TfdsSource: {name!r} has no feature {k!r}; features are {sorted(flat)}")
        decoders = _nested({image_key: tfds.decode.SkipDecoding()})
        try:
            self.source = builder.as_data_source(split=split, decoders=decoders)
        except Exception as e:  # e.g. prepared as TFRecord only
            raise ValueError(f"TfdsSource: cannot open {name!r} split {split!r} as a data source "
                             f"(prepare it with file_format='array_record'): {e}") from e
        self.name, self.split = name, split
        self.image_key, self.caption_key, self.extra_keys = image_key, caption_key, tuple(extra_keys)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        rec = self.source[index]
        out = {"image": _get(rec, self.image_key), "caption": _as_caption(_get(rec, self.caption_key))}
        for k in self.extra_keys:
            out[k] = np.asarray(_get(rec, k))
        return out

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)"


def shapes_source(data_dir: str | os.PathLike, split: str = "train", image_size: int = 64,
                 num_train: int = 2000, num_validation: int = 200, num_heldout: int = 200,
                 seed: int = 0, with_labels: bool = False, max_shapes: int = 2,
                 shape_scale: float = 1.0) -> TfdsSource:
    """The built-in ``shapes_captions`` dataset (built on first use) as a ``TfdsSource``."""
    from ldm_jax.data.shapes_captions import build_shapes_captions

    builder = build_shapes_captions(data_dir, image_size, num_train, num_validation, num_heldout, seed, max_shapes,
                                    shape_scale)
    extra = ("num_shapes", "background", "shape", "color", "size", "position", "center", "radius")
    return TfdsSource(f"shapes_captions/{builder.builder_config.name}", split=split, data_dir=data_dir,
                      image_key="image", caption_key="caption", extra_keys=extra if with_labels else ())


SOURCE_KINDS = ("folder", "tar", "tfds", "shapes")


def make_source(data, image_size: int, *, split: str | None = None, workdir: str | None = None):
    """The random-access source a data config names: the one dispatcher from config to source.

    ``data`` (``config.data``): ``source`` is one of :data:`SOURCE_KINDS` with its fields:

    - ``folder``: images under ``path`` (captions from ``captions_file``, from ``.txt`` files in
      ``captions_dir`` or next to the images, one per line with ``caption_lines``), :class:`FolderSource`;
    - ``tar``: webdataset ``shards`` (a glob or a list), :class:`TarShardSource`;
    - ``tfds``: prepared tfds dataset ``name`` (``data_dir``, ``image_key``, ``caption_key``),
      :class:`TfdsSource`;
    - ``shapes``: the built-in ``shapes_captions`` at ``image_size`` px, built on first use under
      ``data_dir`` (default ``workdir/data``) with ``num_train``/``num_validation``/``num_heldout``
      examples, generation seed ``dataset_seed``, ``max_shapes`` per scene and ``shape_scale``.

    ``split`` (default ``data.split``) selects the tfds/shapes split. The synthetic sources and
    cached latents are iterators, not sources: :func:`ldm_jax.data.batches.make_batches`.
    ``source`` may carry its place, as on the command line: ``folder:DIR``, ``tar:GLOB``,
    ``tfds:NAME[@DATA_DIR]``, ``shapes:DATA_DIR``.
    """
    kind, sep, rest = str(data.source).partition(":")
    if sep and kind in SOURCE_KINDS:
        data = data.copy_and_resolve_references()
        data.source = kind
        if kind == "folder":
            data.path = rest
        elif kind == "tar":
            data.shards = rest
        elif kind == "tfds":
            data.name, _, dd = rest.partition("@")
            data.data_dir = dd or data.data_dir
        else:
            data.data_dir = rest
    kind = data.source
    split = split or data.split
    if kind == "folder":
        if not data.path:
            raise ValueError("data.source 'folder' needs data.path")
        return FolderSource(data.path, data.captions_file or None, captions_dir=data.captions_dir or None,
                            caption_lines=bool(data.caption_lines))
    if kind == "tar":
        if not data.shards:
            raise ValueError("data.source 'tar' needs data.shards")
        return TarShardSource(data.shards if isinstance(data.shards, str) else list(data.shards))
    if kind == "tfds":
        if not data.name:
            raise ValueError("data.source 'tfds' needs data.name")
        return TfdsSource(data.name, split=split, data_dir=data.data_dir or None, image_key=data.image_key or None,
                          caption_key=data.caption_key or None)
    if kind == "shapes":
        data_dir = data.data_dir or (os.path.join(workdir, "data") if workdir else None)
        if not data_dir:
            raise ValueError("data.source 'shapes' needs data.data_dir (or a workdir)")
        return shapes_source(data_dir, split, image_size=int(image_size), num_train=int(data.num_train),
                             num_validation=int(data.num_validation), num_heldout=int(data.num_heldout),
                             seed=int(data.dataset_seed), max_shapes=int(data.max_shapes),
                             shape_scale=float(data.shape_scale))
    raise ValueError(f"data.source must be one of {', '.join(SOURCE_KINDS)}, synthetic or synthetic_latents; "
                     f"got {kind!r}")


def source_from_spec(spec: str, split: str = "train"):
    """A source from a command-line string (through :func:`make_source`):

    - ``folder:DIR`` or an existing directory: :class:`FolderSource`;
    - ``tar:GLOB`` or a path / glob ending in ``.tar``: :class:`TarShardSource`;
    - ``tfds:NAME[@DATA_DIR]`` (``NAME`` may include ``/config``): :class:`TfdsSource` of ``split``;
    - ``shapes:DATA_DIR``: the built-in ``shapes_captions`` (64 px, default sizes) of ``split``.
    """
    from ldm_jax.configs.common import data_config

    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS:
        kind, rest = ("folder" if os.path.isdir(spec) else "tar" if spec.endswith(".tar") else ""), spec
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data source {spec!r}: expected an image folder, .tar shards, folder:DIR, tar:GLOB, "
                         f"tfds:NAME[@DATA_DIR] or shapes:DATA_DIR")
    data = data_config(source=kind, split=split)
    if kind == "folder":
        data.path = rest
    elif kind == "tar":
        data.shards = rest
    elif kind == "tfds":
        data.name, _, data.data_dir = rest.partition("@")
    else:
        data.data_dir = rest
    return make_source(data, 64)


def _flat_features(features, prefix: str = "") -> dict:
    import tensorflow_datasets as tfds

    out = {}
    items = features.items() if hasattr(features, "items") else []
    for k, f in items:
        key = f"{prefix}{k}"
        if isinstance(f, tfds.features.Sequence) and hasattr(f.feature, "items"):
            out.update(_flat_features(f.feature, key + "/"))
        elif isinstance(f, tfds.features.FeaturesDict):
            out.update(_flat_features(f, key + "/"))
        else:
            out[key] = f.feature if isinstance(f, tfds.features.Sequence) else f
    return out


def _nested(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        d = out
        parts = k.split("/")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def _get(rec, key: str):
    for p in key.split("/"):
        rec = rec[p]
    return rec
