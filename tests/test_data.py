"""Data pipeline: shapes_captions, per-host sharding, resume, sources, corrupt files, cached latents."""
import csv
import io
import json
import tarfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data import (DevicePrefetchIterator, FolderSource, TarShardSource, TfdsSource, make_iterator,
                          shapes_source)
from ldm_jax.data import shapes as S
from ldm_jax.data.latents import CachedLatentsSource, encode_dataset, make_latents_iterator, sample_latents

SIZE = 64
N_TRAIN, N_VAL, N_HELD = 48, 16, 16


def fake_tokenizer(captions):
    """Deterministic stand-in: [BOS, char codes..., EOS, pad] int32 [B, 77]."""
    out = np.full((len(captions), 77), 2, np.int32)
    for i, c in enumerate(captions):
        ids = [0] + [3 + (ord(ch) % 97) for ch in c][:75] + [1]
        out[i, :len(ids)] = ids
    return out


def test_no_tensorflow():
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    shapes_source(d, "train", SIZE, N_TRAIN, N_VAL, N_HELD, seed=3)  # builds once
    return d


def _split(shapes_dir, split):
    return shapes_source(shapes_dir, split, SIZE, N_TRAIN, N_VAL, N_HELD, seed=3, with_labels=True)


def _decode(rec):
    return np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"))


_AREA_PER_R2 = {"circle": np.pi, "square": 2.0, "triangle": 3 * np.sqrt(3) / 4, "diamond": 2.0,
                "star": 5 * 0.45 * np.sin(np.pi / 5)}


def test_shapes_reproducible_and_labels_match_pixels(shapes_dir):
    src = _split(shapes_dir, "train")
    assert len(src) == N_TRAIN
    cell = SIZE / 3
    for i in range(N_TRAIN):
        rec = src[i]
        img = _decode(rec)
        ref = S.make_example(3, "train", i, SIZE)
        np.testing.assert_array_equal(img, ref["image"])  # stored == regenerated from the seed
        assert rec["caption"] == ref["caption"]
        bg = S.COLOR_RGB[int(rec["background"])]
        n = int(rec["num_shapes"])
        assert n in (1, 2) and (rec["shape"][n:] == -1).all()
        assert S.COLORS[int(rec["background"])] in rec["caption"]
        # the background colour is the most common one and no shape has it
        assert (img == bg).all(-1).mean() > 0.5
        for k in range(n):
            colour = S.COLOR_RGB[rec["color"][k]]
            assert S.COLORS[rec["color"][k]] in rec["caption"]
            assert int(rec["color"][k]) != int(rec["background"])
            cx, cy = rec["center"][k]
            assert (img[int(cy), int(cx)] == colour).all()
            # the colour's pixels inside the labelled grid cell: centred on the label, of the right area
            row, col = divmod(int(rec["position"][k]), 3)
            r0, c0 = int(round(row * cell)), int(round(col * cell))
            r1, c1 = int(round((row + 1) * cell)), int(round((col + 1) * cell))
            mask = (img[r0:r1, c0:c1] == colour).all(-1)
            ys, xs = np.nonzero(mask)
            assert abs(xs.mean() + c0 + 0.5 - cx) < 0.12 * cell and abs(ys.mean() + r0 + 0.5 - cy) < 0.15 * cell
            r = float(rec["radius"][k])
            np.testing.assert_allclose(r, S.SIZE_FRACTIONS[rec["size"][k]] * cell, rtol=1e-5)
            ratio = mask.sum() / (r + 0.5) ** 2 / _AREA_PER_R2[S.SHAPES[rec["shape"][k]]]
            # +0.5 px and the bound 1.4: PIL fills boundary pixels (thin star/triangle tips); a wrong size
            # label would give ~0.35 or ~2.9 (large/small area ratio is ~3)
            assert 0.8 < ratio < 1.4, (i, k, ratio)
        # pixels of the shapes' colours appear only in their cells
        other = np.ones((SIZE, SIZE), bool)
        for k in range(n):
            row, col = divmod(int(rec["position"][k]), 3)
            other[int(row * cell):int((row + 1) * cell) + 1, int(col * cell):int((col + 1) * cell) + 1] = False
        for k in range(n):
            assert not (img[other] == S.COLOR_RGB[rec["color"][k]]).all(-1).any()
    # a different seed gives different scenes
    assert any(S.make_example(4, "train", i, SIZE)["caption"] != S.make_example(3, "train", i, SIZE)["caption"]
               for i in range(4))


def test_shape_scale_scales_radii_only():
    base = S.make_example(0, "train", 3, 32, max_shapes=1)
    big = S.make_example(0, "train", 3, 32, max_shapes=1, shape_scale=1.15)
    assert big["caption"] == base["caption"] and big["shape"][0] == base["shape"][0]
    np.testing.assert_allclose(big["radius"][0], 1.15 * base["radius"][0], rtol=1e-6)
    np.testing.assert_array_equal(big["center"], base["center"])
    fg = lambda ex: int((ex["image"] != S.COLOR_RGB[ex["background"]]).any(-1).sum())  # noqa: E731
    assert fg(big) > fg(base)  # more shape pixels
    for bad in (0.0, S.MAX_SHAPE_SCALE + 0.01):
        with pytest.raises(ValueError, match="shape_scale"):
            S.make_example(0, "train", 0, 32, shape_scale=bad)
    from ldm_jax.data.shapes_captions import shapes_config

    assert shapes_config(32, 10, 2, 2, max_shapes=1, shape_scale=1.15).name.endswith("_max1_scale1.15")
    assert "scale" not in shapes_config(32, 10, 2, 2).name


def test_heldout_pairs_never_in_train(shapes_dir):
    for split, want in (("train", False), ("validation", False), ("heldout", True)):
        src = _split(shapes_dir, split)
        for i in range(len(src)):
            rec = src[i]
            pairs = [(int(s), int(c)) for s, c in zip(rec["shape"], rec["color"]) if s >= 0]
            assert ((pairs[0] in S.HELDOUT_PAIRS) == want) and not any(p in S.HELDOUT_PAIRS for p in pairs[1:])


def _key(batch, j):
    return (str(batch["caption"][j]), batch["center"][j].tobytes())


def test_two_hosts_disjoint_union_is_split(shapes_dir):
    src = _split(shapes_dir, "train")
    extra = ("center",)
    seen = []
    for host in (0, 1):
        it = make_iterator(src, global_batch_size=8, image_size=32, seed=7, num_epochs=1, extra_keys=extra,
                           process_index=host, process_count=2, num_threads=2)
        keys = [_key(b, j) for b in it for j in range(len(b["caption"]))]
        assert len(keys) == N_TRAIN // 2
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    everything = {(src[i]["caption"], src[i]["center"].tobytes()) for i in range(len(src))}
    assert seen[0] | seen[1] == everything


def _batches(it, n):
    return [next(it) for _ in range(n)]


def test_resume_continues_with_next_examples(shapes_dir):
    src = _split(shapes_dir, "train")
    kw = dict(global_batch_size=12, image_size=48, seed=1, random_crop=True, random_flip=True,
              caption_dropout=0.2, tokenizer=fake_tokenizer, process_index=0, process_count=1, num_threads=2)
    it = make_iterator(src, **kw)
    _batches(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = _batches(it, 6)  # crosses the epoch boundary (48 examples = 4 batches)
    it2 = make_iterator(src, **kw)
    it2.set_state(state)
    got = _batches(it2, 6)
    for e, g in zip(expected, got):
        assert sorted(e) == sorted(g) == ["caption", "image", "input_ids"]
        np.testing.assert_array_equal(e["image"], g["image"])
        np.testing.assert_array_equal(e["caption"], g["caption"])
        np.testing.assert_array_equal(e["input_ids"], g["input_ids"])
    # a fresh iterator differs in the second epoch's order (reshuffled), not a replay
    fresh = _batches(make_iterator(src, **kw), 8)
    assert not np.array_equal(fresh[0]["caption"], fresh[4]["caption"])


def test_device_prefetch_state_is_exact(shapes_dir):
    src = _split(shapes_dir, "validation")
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    kw = dict(global_batch_size=8, image_size=32, seed=0, process_index=0, process_count=1, num_threads=2)
    it = DevicePrefetchIterator(make_iterator(src, **kw), sharding, size=2)
    first = next(it)
    assert isinstance(first["image"], jax.Array) and first["image"].sharding == sharding
    state = it.get_state()
    want = next(it)
    it2 = DevicePrefetchIterator(make_iterator(src, **kw), sharding)
    it2.set_state(state)
    got = next(it2)
    np.testing.assert_array_equal(np.asarray(want["image"]), np.asarray(got["image"]))
    np.testing.assert_array_equal(want["caption"], got["caption"])


# ---- bring-your-own sources ------------------------------------------------------------------

def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _examples():
    """8 examples: 6 valid (mixed sizes, formats, modes), 1 corrupt image, 1 empty caption."""
    rng = np.random.default_rng(0)
    ex = []
    for i in range(8):
        arr = rng.integers(0, 256, (30 + 7 * i, 50 - 3 * i, 3), dtype=np.uint8)
        data = _png(arr) if i % 2 else _jpg(arr)
        if i == 4:
            data = _png(arr[..., 0])  # greyscale
        if i == 5:
            data = data[:40]  # truncated -> corrupt
        ex.append((f"im{i}", data, "" if i == 6 else f"an image number {i}"))
    return ex


def _name(key, data):
    return f"{key}.png" if data[:4] == b"\x89PNG" else f"{key}.jpg"


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    ex = _examples()
    paths = {}
    for variant in ("txt", "jsonl", "csv"):
        d = root / variant
        d.mkdir()
        rows = []
        for key, data, cap in ex:
            name = _name(key, data)
            (d / name).write_bytes(data)
            rows.append({"file_name": name, "text": cap})
            if variant == "txt":
                (d / f"{key}.txt").write_text(cap)
        if variant == "jsonl":
            (d / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if variant == "csv":
            with open(d / "metadata.csv", "w", newline="") as f:
                w = csv.DictWriter(f, ["file_name", "text"])
                w.writeheader()
                w.writerows(rows)
        paths[variant] = d
    shards = []
    for s, part in enumerate((ex[:5], ex[5:])):
        p = root / f"shard-{s:05d}.tar"
        with tarfile.open(p, "w") as tar:
            for key, data, cap in part:
                for name, payload in ((_name(key, data), data),
                                      (f"{key}.txt", cap.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append(p)
    paths["tar"] = str(root / "shard-*.tar")
    # a tiny tfds dataset with image + text features, prepared as ArrayRecord, opened by name
    tfds_dir = root / "tfds"
    builder = TinyCaptions(data_dir=str(tfds_dir), file_format="array_record")
    builder.download_and_prepare()
    paths["tfds"] = tfds_dir
    return paths


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Test-only tfds dataset: nested caption list, like coco_captions."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
            "photo": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (key, data, cap) in enumerate(_examples()):
            yield key, {"photo": data, "captions": {"text": [cap, "second caption"]}}


def _sources(byo):
    return {
        "folder_txt": FolderSource(byo["txt"]),
        "folder_jsonl": FolderSource(byo["jsonl"]),
        "folder_csv": FolderSource(byo["csv"]),
        "tar": TarShardSource(byo["tar"]),
        "tfds": TfdsSource("tiny_captions", split="train", data_dir=byo["tfds"]),
    }


def test_sources_same_batch_structure_and_corrupt_counted(byo):
    captions = {}
    for name, src in _sources(byo).items():
        assert len(src) == 8, name
        it = make_iterator(src, global_batch_size=3, image_size=24, seed=0, shuffle=False, num_epochs=1,
                           tokenizer=fake_tokenizer, process_index=0, process_count=1, drop_remainder=False,
                           num_threads=2)
        batches = list(it)
        for b in batches:
            assert sorted(b) == ["caption", "image", "input_ids"], name
            assert b["image"].dtype == np.float32 and b["image"].shape[1:] == (24, 24, 3)
            assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (len(b["caption"]), 77)
            assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert [len(b["caption"]) for b in batches] == [3, 3], name
        assert it.num_skipped == 2 and it.skip_reasons == {"corrupt image": 1, "empty caption": 1}, name
        captions[name] = [str(c) for b in batches for c in b["caption"]]
        images = np.concatenate([b["image"] for b in batches])
        if name == "folder_txt":
            ref_images = images
        else:  # same pixels whatever the container
            np.testing.assert_array_equal(images, ref_images)
    want = [f"an image number {i}" for i in (0, 1, 2, 3, 4, 7)]
    assert all(sorted(c) == want for c in captions.values()), captions


def test_no_valid_examples_is_a_clear_error(tmp_path):
    for i in range(3):
        (tmp_path / f"x{i}.jpg").write_bytes(b"not an image")
        (tmp_path / f"x{i}.txt").write_text("a caption")
    for epochs in (1, None):
        it = make_iterator(FolderSource(tmp_path), global_batch_size=2, image_size=16, num_epochs=epochs,
                           process_index=0, process_count=1, num_threads=1)
        with pytest.raises(ValueError, match="no valid examples"):
            next(it)
    with pytest.raises(ValueError, match="multiple of the number of hosts"):
        make_iterator(FolderSource(tmp_path), global_batch_size=3, image_size=16, process_index=0, process_count=2)


def test_preprocess_resize_shorter_side_and_center_crop():
    from ldm_jax.data import decode_image, preprocess_image

    arr = np.random.default_rng(1).integers(0, 256, (40, 100, 3), dtype=np.uint8)
    out = preprocess_image(decode_image(_png(arr)), 20)
    ref = np.asarray(Image.fromarray(arr).resize((50, 20), Image.BICUBIC))[:, 15:35]
    np.testing.assert_allclose(out, ref / 127.5 - 1, atol=1e-6)
    flipped = preprocess_image(decode_image(arr), 20, flip=True)
    np.testing.assert_array_equal(flipped, out[:, ::-1])


def test_tiny_clip_tokenizer_in_pipeline(shapes_dir):
    tiny = pytest.importorskip("tiny_tokenizer")
    from ldm_jax.models.tokenizer import PromptTokenizer

    tok = PromptTokenizer.from_pretrained(tiny.write_tiny_clip_tokenizer(shapes_dir / "tok"))
    b = next(make_iterator(_split(shapes_dir, "validation"), global_batch_size=4, image_size=32, tokenizer=tok,
                           process_index=0, process_count=1, num_threads=1))
    assert b["input_ids"].shape == (4, 77) and b["input_ids"].dtype == np.int32
    assert (b["input_ids"][:, 0] == tiny.BOS_TOKEN_ID).all()
    np.testing.assert_array_equal(b["input_ids"], tok([str(c) for c in b["caption"]]))


# ---- cached latents ---------------------------------------------------------------------------

def _encode_fn(images, captions):
    b, h, w, _ = images.shape
    pooled = images.reshape(b, h // 4, 4, w // 4, 4, 3).mean((2, 4))
    moments = np.concatenate([pooled, np.full_like(pooled, -2.0)], -1)  # mean, logvar
    return {"moments": moments, "context": fake_tokenizer(captions).astype(np.float32)[:, :, None]}


def test_encode_dataset_and_train_from_latents(byo, tmp_path):
    src = FolderSource(byo["txt"])
    meta = encode_dataset(src, _encode_fn, tmp_path, image_size=16, batch_size=4, num_shards=2,
                          process_index=0, process_count=1, num_threads=1)
    assert meta["num_examples"] == 6 and meta["num_skipped"] == 2
    assert meta["features"]["moments"] == [[4, 4, 6], "float32"]
    cached = CachedLatentsSource(tmp_path)
    assert len(cached) == 6
    ref = list(make_iterator(src, global_batch_size=6, image_size=16, shuffle=False, num_epochs=1,
                             process_index=0, process_count=1, drop_remainder=False, num_threads=1))[0]
    ref_out = _encode_fn(ref["image"], [str(c) for c in ref["caption"]])
    by_caption = {str(c): i for i, c in enumerate(ref["caption"])}
    for j in range(len(cached)):
        rec = cached[j]
        i = by_caption[rec["caption"]]
        np.testing.assert_array_equal(rec["moments"], ref_out["moments"][i])
        np.testing.assert_array_equal(rec["context"], ref_out["context"][i])
    kw = dict(global_batch_size=4, seed=2, process_index=0, process_count=1)
    it = make_latents_iterator(tmp_path, **kw)
    b = next(it)
    assert sorted(b) == ["caption", "context", "moments"] and b["moments"].shape == (4, 4, 4, 6)
    state = it.get_state()
    want = _batches(it, 2)
    it2 = make_latents_iterator(tmp_path, **kw)
    it2.set_state(state)
    for w, g in zip(want, _batches(it2, 2)):
        np.testing.assert_array_equal(w["moments"], g["moments"])
    z = sample_latents(b["moments"], jax.random.PRNGKey(0), scaling_factor=0.5)
    assert z.shape == (4, 4, 4, 3)
    np.testing.assert_allclose(np.asarray(z).std(), 0.5 * np.sqrt(b["moments"][..., :3].var() + np.exp(-2.0)),
                               rtol=0.35)


def test_bench_data_smoke(tmp_path):
    from ldm_jax.benchmarks.data import measure_data

    out = measure_data(image_size=32, num_images=8, source_size=(64, 48), batch_size=4, num_threads=1,
                     workdir=str(tmp_path))
    assert out["decode_resize_crop_images_per_s"] > 0 and out["pipeline_images_per_s"] > 0
    json.dumps(out)


def test_a_config_source_may_carry_its_place(byo):
    """``data.source="folder:DIR"`` / ``"tar:GLOB"`` (as on the command line) name the same sources as
    ``source`` + ``path`` / ``shards``."""
    from ldm_jax.configs.common import data_config
    from ldm_jax.data.sources import make_source

    folder = make_source(data_config(source=f"folder:{byo['txt']}"), 16)
    assert isinstance(folder, FolderSource) and len(folder) == len(FolderSource(byo["txt"]))
    tar = make_source(data_config(source=f"tar:{byo['tar']}"), 16)
    assert isinstance(tar, TarShardSource) and len(tar) == 8
