"""Several captions per image (sidecar lines, jsonl lists, numbered csv columns, the MM-CelebA-HQ
``images/`` + ``text/`` layout): one drawn per epoch, deterministically and resume-exactly; bad caption
input is a clear error or a counted skip."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from ldm_jax.configs.common import data_config
from ldm_jax.data import FolderSource, make_iterator
from ldm_jax.data.sources import make_source

SIZE = 8
LINES = {  # image -> its sidecar text: blank lines, CRLF and stray spaces are not captions
    "a": "a red face\n\nsmiling woman, red\r\n  the red one  \n",
    "b": "blue man\nbeard and blue\nblue portrait\nman in blue\n",
    "c": "green hat\ngreen\n",
}
WANT = {k: [line.strip() for line in v.splitlines() if line.strip()] for k, v in LINES.items()}
GREY = {"a": 40, "b": 120, "c": 200}  # the pixel value identifies the example in a batch


def _image(path, key):
    Image.fromarray(np.full((SIZE, SIZE, 3), GREY[key], np.uint8)).save(path)


def _key(image):
    grey = int(round((float(image[0, 0, 0]) + 1) * 127.5))
    return next(k for k, g in GREY.items() if g == grey)


@pytest.fixture
def sidecars(tmp_path):
    for k, text in LINES.items():
        _image(tmp_path / f"{k}.png", k)
        (tmp_path / f"{k}.txt").write_bytes(text.encode())
    return tmp_path


def _kw(**over):
    kw = dict(global_batch_size=3, image_size=SIZE, seed=3, process_index=0, process_count=1, num_threads=1)
    kw.update(over)
    return kw


def _drawn(it, n=None):
    """[(image key, caption)] of the next ``n`` batches (all when ``n`` is None)."""
    out = []
    for i, b in enumerate(it):
        out += [(_key(im), str(c)) for im, c in zip(b["image"], b["caption"])]
        if n is not None and i + 1 == n:
            break
    return out


def test_sidecar_lines_are_captions_one_drawn_per_epoch(sidecars):
    src = FolderSource(sidecars)
    assert {k: list(src[i]["captions"]) for i, k in enumerate("abc")} == WANT
    assert src[0]["caption"] == "a red face"  # the first, for readers that take one caption
    drawn = _drawn(make_iterator(src, **_kw(num_epochs=24, random_flip=True, random_crop=True)))
    assert len(drawn) == 3 * 24
    seen = {k: {c for key, c in drawn if key == k} for k in WANT}
    assert seen == {k: set(v) for k, v in WANT.items()}  # every line used, nothing else
    # the whole file as one caption, as before this option existed
    whole = FolderSource(sidecars, caption_lines=False)
    assert [whole[i]["captions"] for i in range(3)] == [(LINES[k].strip(),) for k in "abc"]
    assert make_source(data_config(source="folder", path=str(sidecars), caption_lines=False), SIZE)[1]["captions"] \
        == whole[1]["captions"]


def test_caption_draw_is_deterministic_and_resume_exact(sidecars):
    src = FolderSource(sidecars)
    kw = _kw(random_flip=True)
    it = make_iterator(src, **kw)
    first = _drawn(it, 4)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    after = [next(it) for _ in range(5)]  # 3 examples a batch = an epoch: crosses several epochs
    assert _drawn(make_iterator(src, **kw), 4) == first  # same seed, same draws
    resumed = make_iterator(src, **kw)
    resumed.set_state(state)
    for want in after:
        got = next(resumed)
        np.testing.assert_array_equal(got["caption"], want["caption"])
        np.testing.assert_array_equal(got["image"], want["image"])
    other = _drawn(make_iterator(src, **dict(kw, seed=4)), 9)
    assert other != first + _drawn(iter(after))  # another data seed draws otherwise


def test_bucketing_draws_captions_too(sidecars):
    src = FolderSource(sidecars)
    kw = _kw(num_epochs=16)
    it = make_iterator(src, bucketing=True, **kw)
    _drawn(it, 2)
    state = it.get_state()
    rest = _drawn(it)
    assert {c for _, c in rest} <= {c for v in WANT.values() for c in v}
    assert len({c for k, c in rest if k == "b"}) > 1  # a new draw per epoch, not the first caption always
    resumed = make_iterator(src, bucketing=True, **kw)
    resumed.set_state(state)
    assert _drawn(resumed) == rest


def test_jsonl_lists_and_numbered_csv_columns(tmp_path):
    for k in GREY:
        _image(tmp_path / f"{k}.png", k)
    rows = [{"file_name": "a.png", "text": ["red one", " ", "a red face"]},
            {"file_name": "b.png", "text": "just blue"},
            {"file_name": "c.png", "captions": ["green"]}]  # the keys may differ per row
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = FolderSource(tmp_path)
    assert [src[i]["captions"] for i in range(3)] == [("red one", "a red face"), ("just blue",), ("green",)]
    drawn = _drawn(make_iterator(src, **_kw(num_epochs=12)))
    assert {c for k, c in drawn if k == "a"} == {"red one", "a red face"}
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption_1", "caption_2", "caption_3", "note"])
        w.writerows([["a.png", "red", "", "crimson", "x"], ["b.png", "blue", "navy", "azure", "y"]])
    src = FolderSource(tmp_path, tmp_path / "caps.csv")
    assert [src[i]["captions"] for i in range(2)] == [("red", "crimson"), ("blue", "navy", "azure")]


def test_images_and_text_folders(tmp_path):
    """MM-CelebA-HQ: ``images/<id>.jpg`` with ten captions in ``text/<id>.txt``, found without options."""
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "text" / "sub").mkdir(parents=True)
    for i, k in enumerate(GREY):
        rel = f"sub/{i}" if k == "c" else str(i)  # nested folders mirror each other
        _image(tmp_path / "images" / f"{rel}.png", k)
        (tmp_path / "text" / f"{rel}.txt").write_text("".join(f"{k} caption {j}\n" for j in range(10)))
    _image(tmp_path / "images" / "9.jpg", "a")  # no caption file: an empty caption, skipped and counted
    for src in (FolderSource(tmp_path), FolderSource(tmp_path, captions_dir="text"),
                FolderSource(tmp_path / "images", captions_dir=tmp_path / "text"),
                make_source(data_config(source="folder", path=str(tmp_path)), SIZE),
                make_source(data_config(source="folder", path=str(tmp_path), captions_dir="text"), SIZE)):
        assert len(src) == 4 and [len(src[i]["captions"]) for i in range(4)] == [10, 10, 0, 10], src
    it = make_iterator(FolderSource(tmp_path), **_kw(num_epochs=6))
    drawn = _drawn(it)
    assert len(drawn) == 18 and it.skip_reasons == {"empty caption": 6}
    assert all(c.startswith(f"{k} caption ") for k, c in drawn)
    assert len({c for _, c in drawn}) > 3
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match=r"no caption file in .*other.* matches an image .*expected e\.g\. .*0\.txt"):
        FolderSource(tmp_path, captions_dir="other")
    with pytest.raises(ValueError, match="captions folder .* is not a directory"):
        FolderSource(tmp_path, captions_dir="missing")


def test_bad_caption_input(tmp_path):
    for k in GREY:
        _image(tmp_path / f"{k}.png", k)
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_text("")  # empty
    (tmp_path / "c.txt").write_text("\n  \n\n")  # blank lines only
    it = make_iterator(FolderSource(tmp_path), **_kw(global_batch_size=1, num_epochs=2))
    assert [c for _, c in _drawn(it)] == ["fine", "fine"]
    assert it.num_skipped == 4 and it.skip_reasons == {"empty caption": 4}

    (tmp_path / "c.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: no silent replacement
    with pytest.raises(ValueError, match=r"c\.txt' is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        FolderSource(tmp_path)

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n\n"
                    + json.dumps({"file_name": "nope.png", "text": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl line 3 names 'nope\.png', which is not a file under .*"
                                         r"\(1 of 2 rows name missing images\)"):
        FolderSource(tmp_path, rows)
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "text"], ["a.png", "x"], ["gone.png", "y"]])
    with pytest.raises(ValueError, match=r"rows\.csv line 3 names 'gone\.png'"):
        FolderSource(tmp_path, tmp_path / "rows.csv")
    rows.write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl' is not UTF-8 text"):
        FolderSource(tmp_path, rows)
    rows.write_text(json.dumps({"file_name": "a.png", "text": ["ok", 3]}) + "\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl line 1: a caption list must hold strings"):
        FolderSource(tmp_path, rows)
    rows.write_text('{"file_name": "a.png", "text": \n')
    with pytest.raises(ValueError, match=r"rows\.jsonl line 1 is not JSON"):
        FolderSource(tmp_path, rows)
    (tmp_path / "rows.txt").write_text("a.png,x\n")
    with pytest.raises(ValueError, match="captions file must be .jsonl or .csv"):
        FolderSource(tmp_path, tmp_path / "rows.txt")
    with pytest.raises(ValueError, match="not both"):
        FolderSource(tmp_path, rows, captions_dir=tmp_path)
