"""Aspect-ratio bucketing: non-square buckets, one shape per batch, the right examples in each
bucket, exact resume, host-count-independent rows, corrupt files left out or replaced."""
import io

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import FolderSource, make_iterator
from ldm_jax.data.buckets import BucketIterator, assign_buckets, make_buckets

SIZE = 32  # buckets (24, 40), (32, 32), (40, 24) with the default step 8 and max aspect ratio 2
SHAPES = {"wide": (20, 36), "tall": (36, 20), "square": (30, 30)}  # (height, width) of the source images
N_EACH = 8


def _colour(i):
    return np.array([(37 * i) % 256, (91 * i + 40) % 256, (53 * i + 100) % 256], np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """8 wide, 8 tall, 8 square solid-colour images (colour identifies the example), plus one with an
    unreadable header, one whose header reads but whose pixels are truncated, one without caption."""
    d = tmp_path_factory.mktemp("buckets")
    i = 0
    for kind, (h, w) in SHAPES.items():
        for _ in range(N_EACH):
            Image.fromarray(np.broadcast_to(_colour(i), (h, w, 3)).copy()).save(d / f"im{i:02d}.png")
            (d / f"im{i:02d}.txt").write_text(f"{kind} {i}")
            i += 1
    (d / "bad_header.png").write_bytes(b"\x89PNG not really")
    (d / "bad_header.txt").write_text("wide broken")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 36, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[:200])
    (d / "truncated.txt").write_text("wide truncated")
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(d / "nocaption.png")
    return d


def _kw(**over):
    kw = dict(global_batch_size=4, image_size=SIZE, seed=5, process_index=0, process_count=1, num_threads=2)
    kw.update(over)
    return kw


def test_make_buckets():
    assert make_buckets(SIZE) == [(24, 40), (32, 32), (40, 24)]
    for s in (32, 64, 256, 512):
        buckets = make_buckets(s)
        step = 64 if s >= 256 else 8
        assert (s, s) in buckets and any(h != w for h, w in buckets)
        for h, w in buckets:
            assert h % step == 0 and w % step == 0 and h * w <= s * s and max(h, w) <= 2 * min(h, w)
    assert assign_buckets(np.array([[20, 36], [36, 20], [30, 30], [-1, -1]]), make_buckets(SIZE)).tolist() == [0, 2, 1, -1]


def test_batches_share_a_bucket_shape_and_hold_its_examples(folder):
    it = make_iterator(FolderSource(folder), bucketing=True, **_kw(num_epochs=2))
    assert isinstance(it, BucketIterator)
    assert it.buckets == [(24, 40), (32, 32), (40, 24)]
    # bad_header and nocaption are left out by the scan; truncated (header 20x36) sits in the wide bucket
    assert it.bucket_counts.tolist() == [N_EACH + 1, N_EACH, N_EACH]
    assert it.skip_reasons == {"corrupt image": 1, "empty caption": 1}
    assert it.batches_per_epoch == 2 + 2 + 2  # the wide bucket's 9th example sits each epoch out
    want = {(24, 40): "wide", (32, 32): "square", (40, 24): "tall"}
    src, shapes, replaced = FolderSource(folder), [], 0
    for k, batch in enumerate(it):
        assert batch["image"].dtype == np.float32 and batch["image"].ndim == 4 and len(batch["caption"]) == 4
        shape = batch["image"].shape[1:3]
        shapes.append(shape)
        size, idx = it.global_batch_indices(k)
        assert size == shape
        drawn = [src[int(j)]["caption"] for j in idx]
        for img, caption, d in zip(batch["image"], batch["caption"], drawn):
            kind, i = str(caption).split()
            assert kind == want[shape], (shape, caption)  # every image of the batch is of this bucket
            assert i.isdigit()  # the truncated image never reaches a batch
            np.testing.assert_allclose(img, np.broadcast_to(_colour(int(i)) / 127.5 - 1.0, img.shape), atol=1e-5)  # pixels match caption
            if d == "wide truncated":
                replaced += 1
            else:
                assert str(caption) == d
    assert len(shapes) == 2 * it.batches_per_epoch
    assert sorted(set(shapes)) == [(24, 40), (32, 32), (40, 24)]  # non-square batches happen
    for e in range(2):  # no example twice in an epoch; epochs are shuffled differently
        idx = np.concatenate([it.global_batch_indices(e * it.batches_per_epoch + k)[1]
                              for k in range(it.batches_per_epoch)])
        assert len(idx) == len(set(idx.tolist())) == 24
    assert [it.global_batch_indices(k)[1].tolist() for k in range(6)] != \
        [it.global_batch_indices(6 + k)[1].tolist() for k in range(6)]
    # the truncated wide image, when drawn, is replaced by another row of its batch and counted
    assert replaced >= 1 and it.skip_reasons["corrupt image"] == 1 + replaced and it.num_skipped == 2 + replaced


def test_resume_is_exact(folder):
    src = FolderSource(folder)
    kw = _kw(random_crop=True, random_flip=True, caption_dropout=0.3)
    a = make_iterator(src, bucketing=True, **kw)
    for _ in range(4):
        next(a)
    state = a.get_state()
    after = [next(a) for _ in range(9)]  # crosses into the next epoch
    b = make_iterator(src, bucketing=True, **kw)
    b.set_state(state)
    for x in after:
        y = next(b)
        np.testing.assert_array_equal(y["image"], x["image"])
        assert y["caption"].tolist() == x["caption"].tolist()
    assert b.get_state() == a.get_state()
    assert b.num_skipped == a.num_skipped
    # a different seed gives a different schedule
    c = make_iterator(src, bucketing=True, **dict(kw, seed=6))
    c.set_state(state)
    assert any(next(c)["caption"].tolist() != x["caption"].tolist() for x in after[:3])


def test_hosts_split_rows_of_the_same_global_batches(folder):
    src = FolderSource(folder)
    kw = _kw(random_crop=True, random_flip=True)
    whole = make_iterator(src, bucketing=True, **kw)
    halves = [make_iterator(src, bucketing=True, **dict(kw, process_index=p, process_count=2)) for p in range(2)]
    for _ in range(7):
        w = next(whole)
        parts = [next(h) for h in halves]
        assert all(p["image"].shape[0] == 2 for p in parts)
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), w["image"])
        assert np.concatenate([p["caption"] for p in parts]).tolist() == w["caption"].tolist()


def test_errors(folder):
    with pytest.raises(ValueError, match="drop_remainder"):
        make_iterator(FolderSource(folder), bucketing=True, **_kw(drop_remainder=False))
    with pytest.raises(ValueError, match="full global batch"):
        make_iterator(FolderSource(folder), bucketing=True, **_kw(global_batch_size=16))
