"""GPT-2 prompt expansion: the Flax model against transformers' PyTorch GPT2LMHeadModel, the cached
decode loop, sampling settings, one compilation for every prompt length, loading errors."""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert.torch_flax import WeightsError, flax_to_torch, gpt2_params_from_torch
from ldm_jax.models.gpt2 import gpt2_from_config, init_cache, sample_logits
from ldm_jax.prompt_expansion import PromptExpander, load_gpt2
from ldm_jax.reference import write_reference_gpt2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["red", "a photo of a cat", "an astronaut riding a horse on mars, highly detailed"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_reference_gpt2(str(tmp_path_factory.mktemp("gpt2") / "model"), seed=0)


@pytest.fixture(scope="module")
def torch_model(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def expander(folder):
    return PromptExpander.from_pretrained(folder, max_prompt_tokens=24, max_new_limit=24, max_batch=4)


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()


def test_logits_match_transformers(expander, torch_model):
    ids = np.random.default_rng(0).integers(0, expander.model.vocab_size, (2, 12))
    ours = expander.model.apply({"params": expander.params}, ids).logits
    np.testing.assert_allclose(np.asarray(ours), _torch_logits(torch_model, ids), atol=1e-4, rtol=0)


def test_greedy_matches_transformers_generate(expander, torch_model):
    n = 12
    ours = expander.generate_ids(PROMPTS, temperature=0.0, max_new_tokens=n)  # one left-padded batch
    for prompt, got in zip(PROMPTS, ours):
        x = torch.tensor([expander.tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            ref = torch_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                       pad_token_id=torch_model.config.eos_token_id)
        assert got == ref[0, x.shape[1]:].tolist(), prompt


def test_cached_logits_equal_full_recompute(expander):
    """Prefill a left-padded prompt into the cache, then feed tokens one by one: each step's logits are
    those of the whole (unpadded) sequence recomputed without a cache."""
    model, params = expander.model, expander.params
    seq = np.random.default_rng(1).integers(0, model.vocab_size, (1, 10)).astype(np.int32)
    full = np.asarray(model.apply({"params": params}, seq).logits)
    pad, prompt_len, slots = 3, 4, 16
    ids = np.zeros((1, pad + prompt_len), np.int32)
    ids[0, pad:] = seq[0, :prompt_len]
    valid = np.arange(slots)[None] >= pad
    positions = np.maximum(np.arange(pad + prompt_len) - pad, 0)[None]
    apply = jax.jit(lambda p, t, pos, c, i: model.apply({"params": p}, t, attention_mask=valid, position_ids=pos,
                                                        cache=c, cache_index=i))
    out = apply(params, ids, positions, init_cache(model, 1, slots), 0)
    np.testing.assert_allclose(np.asarray(out.logits[0, pad:]), full[0, :prompt_len], atol=1e-5, rtol=0)
    cache = out.cache
    for t in range(prompt_len, seq.shape[1]):
        out = apply(params, seq[:, t:t + 1], np.array([[t]]), cache, pad + t)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits[0, 0]), full[0, t], atol=1e-5, rtol=0)


def test_sampling_seeds_and_top_k(expander):
    kw = dict(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=16)
    a = expander.generate_ids(PROMPTS, seed=0, **kw)
    assert expander.generate_ids(PROMPTS, seed=0, **kw) == a
    assert expander.generate_ids(PROMPTS, seed=1, **kw) != a
    # a prompt's sample depends on its text and seed alone, not on the rest of the batch
    assert expander.generate_ids([PROMPTS[1]], seed=0, **kw) == [a[1]]
    assert expander.generate_ids(PROMPTS, seed=[5, 0, 7], **kw)[1] == a[1]
    greedy = expander.generate_ids(PROMPTS, temperature=0.0, max_new_tokens=16)
    assert expander.generate_ids(PROMPTS, temperature=1.5, top_k=1, max_new_tokens=16, seed=3) == greedy
    assert expander.generate_ids(PROMPTS, temperature=1.5, top_p=1e-6, max_new_tokens=16, seed=3) == greedy


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400).reshape(400, 1)

    draw = jax.jit(jax.vmap(lambda k, top_k, top_p: sample_logits(logits, k, 1.0, top_k, top_p), (0, None, None)))

    def draws(top_k, top_p):
        return np.unique(np.asarray(draw(keys, top_k, top_p)))

    assert set(draws(2, 1.0)) == {0, 1}
    assert set(draws(0, 0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8: the two likeliest
    assert set(draws(0, 0.5)) == {0}
    assert set(draws(0, 1.0)) == {0, 1, 2, 3}
    assert int(sample_logits(logits, keys[0], 0.0, 0, 1.0)[0]) == 0


def test_one_compile_serves_every_prompt_length(expander):
    fresh = PromptExpander(expander.model, expander.params, expander.tokenizer, max_prompt_tokens=24,
                           max_new_limit=8, max_batch=2)
    words = "a photo of a cat riding a horse on mars in the sky".split()  # up to 23 tokens
    for n in range(0, len(words) + 1, 3):
        for settings in (dict(temperature=0.0), dict(temperature=0.8, top_k=5, top_p=0.9, seed=n)):
            fresh.generate_ids([" ".join(words[:n]), "dog"], max_new_tokens=1 + n % 8, **settings)
    assert fresh._generate._cache_size() == 1


def test_expand_text(expander):
    out = expander.expand(PROMPTS + ["  two\nlines  "], temperature=1.0, top_k=20, max_new_tokens=12, seed=0)
    assert len(out) == 4
    for prompt, text in zip(PROMPTS + ["two lines"], out):
        assert text.startswith(prompt) and "\n" not in text and text == " ".join(text.split())
    assert expander.expand(PROMPTS[0], temperature=0.0, max_new_tokens=4) == \
        expander.expand([PROMPTS[0]], temperature=0.0, max_new_tokens=4)
    with pytest.warns(UserWarning, match="continues its last 24"):  # longer prompts keep their end
        long = expander.expand(" ".join(PROMPTS * 3), temperature=0.0, max_new_tokens=4)[0]
    assert long.startswith(" ".join(PROMPTS * 3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        expander.expand("a", max_new_tokens=25)
    with pytest.raises(ValueError, match="seed"):
        expander.expand(["a", "b"], seed=[1])


def test_eos_stops_decoding(expander):
    """Decoding ends at EOS, which is kept: with EOS made the likeliest token (the final LayerNorm's
    bias pushed along its embedding) each continuation is EOS alone, and each expansion its prompt."""
    eos = expander.eos_token_id
    forced = copy.copy(expander)  # the same compiled loop, other params
    forced.params = jax.tree.map(lambda x: x, expander.params)
    ln_f, wte = forced.params["transformer"]["ln_f"], forced.params["transformer"]["wte"]["embedding"]
    ln_f["bias"] = ln_f["bias"] + 50.0 * wte[eos] / jnp.linalg.norm(wte[eos])
    assert forced.generate_ids(PROMPTS, temperature=0.0, max_new_tokens=8) == [[eos]] * 3
    assert forced.expand(PROMPTS, temperature=1.0, seed=0) == PROMPTS
    assert expander.generate_ids(PROMPTS, temperature=0.0, max_new_tokens=8) != [[eos]] * 3


def test_params_map_both_key_layouts(folder, expander, tmp_path):
    """Checkpoints with or without the ``transformer.`` prefix, with the old ``attn.bias`` buffers, and
    pickled ones (``allow_pickle``) map to the same params."""
    from ldm_jax.convert.checkpoint_io import load_state_dict

    sd = load_state_dict(os.path.join(folder, "model.safetensors"))
    shapes = jax.eval_shape(expander.model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    bare = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), bool))
    bare["h.0.attn.masked_bias"] = np.float32(-1e4)
    same = jax.tree.map(np.array_equal, gpt2_params_from_torch(bare, shapes), gpt2_params_from_torch(sd, shapes))
    assert all(jax.tree.leaves(same))
    back = flax_to_torch(expander.params)  # the table's inverse: transformers' own names, Conv1D untransposed
    assert set(back) == set(sd) - {"lm_head.weight"}
    np.testing.assert_array_equal(back["transformer.h.0.attn.c_attn.weight"], sd["transformer.h.0.attn.c_attn.weight"])
    with pytest.raises(WeightsError, match="missing key"):
        gpt2_params_from_torch({k: v for k, v in sd.items() if "ln_f" not in k}, shapes)

    pickled = tmp_path / "pickled"  # an old-style folder: config.json and pytorch_model.bin
    pickled.mkdir()
    (pickled / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, str(pickled / "pytorch_model.bin"))
    pickled = str(pickled)
    with pytest.raises(WeightsError, match="allow_pickle"):
        load_gpt2(pickled)
    _, params, _ = load_gpt2(pickled, allow_pickle=True)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, gpt2_params_from_torch(sd, shapes))))


def test_bad_sources(tmp_path, folder):
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip_text_model", "architectures": ["CLIPTextModel"],
                                                  "hidden_size": 32}))
    with pytest.raises(ValueError, match=r"is not a GPT-2 model: model_type 'clip_text_model'.*CLIPTextModel"):
        PromptExpander.from_pretrained(str(clip))
    with pytest.raises(ValueError, match=r"not a GPT-2 language model: architectures \['GPT2ForSequence"):
        gpt2_from_config({"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptExpander.from_pretrained(str(tmp_path / "missing"))
    empty = tmp_path / "sd"
    empty.mkdir()
    (empty / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no config.json \(it holds model_index.json\)"):
        load_gpt2(str(empty))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    with pytest.raises(WeightsError, match="holds no GPT-2 weights"):
        load_gpt2(str(no_weights))


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    """The tiny SD config with zero weights: the diffusion itself is not under test here."""
    from ldm_jax.configs.tiny import get_config
    from ldm_jax.convert.diffusers_folder import build_configs_and_shapes
    from ldm_jax.models.tokenizer import PromptTokenizer
    from ldm_jax.pipeline import StableDiffusionPipeline
    from ldm_jax.tiny_tokenizer import write_tiny_clip_tokenizer

    config = get_config()
    _, shapes = build_configs_and_shapes({k: dict(config[k]) for k in ("unet", "vae", "text_encoder")})
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    tokenizer = PromptTokenizer.from_pretrained(write_tiny_clip_tokenizer(str(tmp_path_factory.mktemp("tok"))))
    return StableDiffusionPipeline(config, params, tokenizer)


def test_pipeline_and_serve_expand_prompts(sd_pipe, expander, folder, monkeypatch):
    """``__call__(expand_prompt=...)`` conditions on the expanded prompts (each with its first image's
    seed), ``expand_prompts`` returns them, and the server samples them and puts them in the response's info."""
    import asyncio

    import httpx

    from ldm_jax.serve.app import Server, ServeConfig, create_app

    class Conditioned(Exception):  # the prompts reached the text encoder: the rest is the usual call
        pass

    def prepare(self, prompt, *a, **kw):
        raise Conditioned(prompt)

    with pytest.raises(ValueError, match="no prompt expander loaded"):
        sd_pipe("a cat", expand_prompt=True)
    monkeypatch.setattr(type(sd_pipe), "prepare_txt2img", prepare)
    with pytest.raises(Conditioned) as got:
        sd_pipe(PROMPTS, expand_prompt=expander, expansion_temperature=0.9, seed=[4, 4, 9, 9, 1, 1],
                num_images_per_prompt=2)
    assert got.value.args[0] == expander.expand(PROMPTS, temperature=0.9, seed=[4, 9, 1]) != PROMPTS
    assert sd_pipe.prompt_expander is None  # an expander passed per call is not kept
    with pytest.raises(Conditioned) as got:
        sd_pipe(PROMPTS[0], expand_prompt=folder, seed=4)  # a source: loaded and kept
    assert sd_pipe.prompt_expander.source == folder
    assert got.value.args[0] == sd_pipe.expand_prompts(PROMPTS[0], seed=4) == [got.value.args[0][0]]
    monkeypatch.undo()

    server = Server(sd_pipe, ServeConfig(buckets=(1,)), model_name="tiny")
    sampled = []

    async def generate(key, rows):  # the batcher and the denoising loop are test_serve's
        sampled.append([r.prompt for r in rows])
        return np.zeros((len(rows), key.height, key.width, 3), np.float32)

    server.generate = generate
    try:
        async def post(body):
            transport = httpx.ASGITransport(app=create_app(server))
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
                r = await client.post("/sdapi/v1/txt2img", json=body)
                return r.status_code, r.json()

        body = dict(prompt=PROMPTS[1], steps=2, seed=7, batch_size=2, width=16, height=16)
        status, out = asyncio.run(post(body))
        assert status == 200, out
        info = json.loads(out["info"])
        expected = sd_pipe.expand_prompts(PROMPTS[1], seed=7)[0]
        assert info["expanded_prompt"] == expected == out["parameters"]["expanded_prompt"] != PROMPTS[1]
        assert info["all_prompts"] == sampled[-1] == [expected] * 2 and info["prompt"] == PROMPTS[1]
        status, out = asyncio.run(post(dict(body, expand_prompt=False)))
        assert status == 200 and json.loads(out["info"])["expanded_prompt"] is None
        assert sampled[-1] == [PROMPTS[1]] * 2
        assert asyncio.run(post(dict(body, expand_prompt="yes")))[0] == 422
    finally:
        server.close()


def test_sample_command_writes_expanded_prompts(sd_pipe, folder, tmp_path, monkeypatch, capsys):
    """``ldm-jax sample --expand-prompt SRC``: each prompt expanded with its seed, ``prompts.json`` beside
    the images; a source that is not GPT-2 is a one-line error."""
    from PIL import Image

    import ldm_jax.pipeline as pipeline_lib
    from ldm_jax.cli import cli

    sampled = []

    def call(self, prompt, negative_prompt=None, *, num_images_per_prompt=1, seed=0, **kw):
        sampled.append((prompt, seed))
        return [Image.new("RGB", (16, 16))] * num_images_per_prompt

    monkeypatch.setattr(pipeline_lib, "load_pipeline", lambda *a, **kw: sd_pipe)
    monkeypatch.setattr(type(sd_pipe), "__call__", call)
    out = tmp_path / "out"
    assert cli(["sample", "--model", "tiny", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-images", "2",
                "--seed", "3", "--expand-prompt", folder, "--expansion-temperature", "0.8", "--out", str(out)]) == 0
    records = json.loads((out / "prompts.json").read_text())
    expanded = [sd_pipe.expand_prompts(p, temperature=0.8, seed=3 + k)[0] for k, p in enumerate(PROMPTS[:2])]
    assert sampled == [(expanded[0], 3), (expanded[1], 4)]
    assert records == [dict(image=f"{k:03d}_{j:02d}.png", prompt=PROMPTS[k], expanded_prompt=expanded[k], seed=3 + k)
                       for k in range(2) for j in range(2)]
    assert cli(["sample", "--model", "tiny", "--prompt", "a", "--expand-prompt", str(tmp_path / "missing"),
                "--out", str(out)]) != 0
    assert "does not exist" in capsys.readouterr().err
