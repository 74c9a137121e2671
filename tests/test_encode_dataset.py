"""`ldm-jax encode-dataset` on a tiny random SD model: cached moments/context equal our encoders,
an interrupted encoding resumes, and training from the cache equals training from the images."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax.cli import main
from ldm_jax.config_utils import load_config
from ldm_jax.data import FolderSource, make_iterator
from ldm_jax.data.latents import CachedLatentsSource, ModelEncoder, encode_dataset, make_latents_iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # the reference VAE downsamples by 2: 8x8x4 latents


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ldm_jax.convert import load_model
    from ldm_jax.reference import write_reference_folder

    root = tmp_path_factory.mktemp("encode")
    model = write_reference_folder(str(root / "model"), "v1")
    data = root / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):  # 8 valid images of assorted sizes + 1 corrupt
        name = data / f"im{i}.png"
        if i == 8:
            name.write_bytes(b"\x89PNG not really")
        else:
            Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 30 - 2 * i, 3), dtype=np.uint8)).save(name)
        (data / f"im{i}.txt").write_text(f"a photo of thing {i}")
    out = root / "cache"
    return {"model": model, "loaded": load_model(model), "data": data, "out": out, "root": root}


@pytest.fixture(scope="module")
def encoded(setup):
    main(["encode-dataset", "--model", setup["model"], "--source", str(setup["data"]), "--out", str(setup["out"]),
          "--image-size", str(SIZE), "--batch-size", "4", "--shard-size", "4"])
    return CachedLatentsSource(setup["out"])


@pytest.fixture(scope="module")
def reference(setup):
    """Images/captions as the encoder saw them, and our VAE and CLIP text encoder run directly."""
    from ldm_jax.models.autoencoder import AutoencoderKL, vae_from_config
    from ldm_jax.models.clip_text import clip_text_from_config
    from ldm_jax.models.tokenizer import PromptTokenizer

    loaded = setup["loaded"]
    b = next(make_iterator(FolderSource(setup["data"]), global_batch_size=16, image_size=SIZE, shuffle=False,
                           num_epochs=1, process_index=0, process_count=1, drop_remainder=False, num_threads=1))
    captions = [str(c) for c in b["caption"]]
    post = vae_from_config(dict(loaded.config.vae)).apply({"params": loaded.params["vae"]}, b["image"],
                                                           method=AutoencoderKL.encode)
    ids = PromptTokenizer.from_pretrained(loaded.tokenizer_path)(captions)
    ctx = clip_text_from_config(dict(loaded.config.text_encoder)).apply({"params": loaded.params["text_encoder"]}, ids)
    return captions, b["image"], np.asarray(post.mean), np.asarray(post.logvar), np.asarray(ctx.context), ids


def test_cli_cache_equals_our_encoders(setup, encoded, reference):
    meta = json.load(open(setup["out"] / "metadata-00000.json"))
    assert meta["num_examples"] == 8 and meta["num_skipped"] == 1 and meta["skip_reasons"] == {"corrupt image": 1}
    assert meta["files"] == [f"latents-00000-{s:05d}.array_record" for s in range(2)]
    assert meta["features"]["moments"] == [[8, 8, 8], "float32"]
    assert meta["features"]["context"] == [[77, 32], "float32"] and meta["features"]["input_ids"] == [[77], "int32"]
    assert meta["info"]["scaling_factor"] == 0.18215 and meta["info"]["hidden_layer"] == "last"
    assert not [p for p in os.listdir(setup["out"]) if p.startswith((".partial", "progress"))]
    captions, _, mean, logvar, context, ids = reference
    assert len(encoded) == 8
    for j in range(len(encoded)):
        rec = encoded[j]
        i = captions.index(rec["caption"])
        np.testing.assert_allclose(rec["moments"][..., :4], mean[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rec["moments"][..., 4:], logvar[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rec["context"], context[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(rec["input_ids"], ids[i])
    b = next(make_latents_iterator(setup["out"], global_batch_size=4, seed=1, process_index=0, process_count=1))
    assert b["moments"].shape == (4, 8, 8, 8) and b["context"].shape == (4, 77, 32)
    assert b["input_ids"].shape == (4, 77) and b["input_ids"].dtype == np.int32 and len(b["caption"]) == 4


def test_interrupted_encoding_resumes(setup, encoded):
    enc = ModelEncoder(setup["loaded"], devices=jax.devices()[:1])
    calls = []

    def flaky(images, captions):
        calls.append(len(captions))
        if len(calls) == 2:
            raise RuntimeError("preempted")
        return enc(images, captions)

    out = setup["root"] / "resumed"
    kw = dict(image_size=SIZE, batch_size=4, shard_size=4, info=enc.info, process_index=0, process_count=1,
              num_threads=1)
    with pytest.raises(RuntimeError, match="preempted"):
        encode_dataset(FolderSource(setup["data"]), flaky, out, **kw)
    assert sorted(os.listdir(out)) == [".partial-00000", "latents-00000-00000.array_record", "progress-00000.json"]
    with pytest.raises(ValueError, match="not finished"):
        CachedLatentsSource(out)
    calls.clear()

    def counting(images, captions):
        calls.append(len(captions))
        return enc(images, captions)

    meta = encode_dataset(FolderSource(setup["data"]), counting, out, **kw)
    assert len(calls) == 1 and meta["num_examples"] == 8 and meta["num_skipped"] == 1  # only the second shard
    resumed, full = CachedLatentsSource(out), encoded
    assert len(resumed) == len(full)
    for j in range(len(full)):
        a, b = resumed[j], full[j]
        assert a["caption"] == b["caption"]
        np.testing.assert_allclose(a["moments"], b["moments"], rtol=1e-5, atol=1e-6)
    assert encode_dataset(FolderSource(setup["data"]), None, out, **kw) == meta  # done: nothing to do
    with pytest.raises(ValueError, match="different encoding"):
        encode_dataset(FolderSource(setup["data"]), enc, out, **dict(kw, image_size=8))


def test_training_from_cache_equals_training_from_images(setup, encoded, reference):
    """The trainer's batch source for data.cached_latents, then 3 train steps on its batches vs 3
    steps on the same examples as images (+ token ids) through the frozen encoders: same losses."""
    from ldm_jax.train import diffusion_task as D

    loaded = setup["loaded"]
    c = load_config("tiny_train", [f"--config.data.cached_latents={setup['out']}"])
    for k in ("vae", "text_encoder", "scheduler"):  # the encoders that made the cache
        c[k] = loaded.config[k]
    # a one-level UNet and unoptimised XLA: compiling dominates this test
    c.unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8,), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                  attention_head_dim=4, cross_attention_dim=32, norm_num_groups=4)
    c.stages = [dict(resolution=SIZE, steps=3, batch_size=4)]
    c.train.text_dropout = 0.5
    c.data.seed = 3
    stage = D.get_stages(c)[0]
    source = D.make_batch_source(c, stage, (0, 4))
    first = next(source)
    assert sorted(first) == ["context", "input_ids", "moments"]
    assert first["moments"].shape == (4, 8, 8, 8) and first["context"].shape == (4, 77, 32)
    state = source.get_state()
    cached = [next(source) for _ in range(2)]
    again = D.make_batch_source(c, stage, (0, 4))
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["moments"], cached[0]["moments"])  # resumes exactly
    cached.insert(0, first)
    with pytest.raises(ValueError, match="encoded at 16 px"):
        D.make_batch_source(c, D.Stage(32, 1, 4), (0, 4))

    captions, images, *_, ids = reference
    models = D.build_models(c)
    tx, schedule = D.make_optimizer(c)
    opts = {"xla_backend_optimization_level": 0}
    init = jax.jit(lambda k: D.create_train_state(c, models._replace(vae=None), k, (1, 8, 8, 4), tx)[0],
                   compiler_options=opts)
    step = jax.jit(D.make_train_step(c, models, tx, schedule), compiler_options=opts)
    frozen = {"text": loaded.params["text_encoder"], "vae": loaded.params["vae"],
              "empty_ids": np.asarray(D.empty_prompt_ids(c))}
    s_img = s_lat = init(jax.random.PRNGKey(0))
    losses, dropped = [], []
    for batch in cached:
        rows = [int(np.flatnonzero((ids == r).all(1))[0]) for r in batch["input_ids"]]
        s_img, m_img = step(s_img, {"image": images[rows], "input_ids": ids[rows]}, frozen)
        s_lat, m_lat = step(s_lat, batch, frozen)
        losses.append((float(m_img["loss"]), float(m_lat["loss"])))
        assert float(m_img["text_dropped"]) == float(m_lat["text_dropped"])
        dropped.append(float(m_lat["text_dropped"]))
    a, b = np.array(losses).T
    assert a.min() > 0
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert any(0 < d < 1 for d in dropped)  # both the cached and the empty-prompt context were used
    for x, y in zip(jax.tree.leaves(s_img.params), jax.tree.leaves(s_lat.params)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
