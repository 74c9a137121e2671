"""CLIP text encoder and prompt tokenizer against transformers (tiny random models, tiny BPE vocab)."""
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers import CLIPTextConfig, CLIPTokenizer

from ldm_jax.config_utils import load_config
from ldm_jax.convert.torch_flax import WeightsError, clip_text_params_from_torch, flax_to_torch
from ldm_jax.models.clip_text import CLIPTextModel, clip_text_from_config
from ldm_jax.models.tokenizer import PromptTokenizer
from tiny_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, write_tiny_clip_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "Zebra! über 123, highly-detailed   digital ART",
    "a beautiful painting of a castle near the sea at sunset, trending on artstation",
]
LONG_PROMPT = " ".join(["a red cat sitting on a blue chair"] * 12)  # 96 words -> > 77 tokens

# SD v1 style: quick_gelu, legacy eos_token_id=2 (pool at argmax id), pad = EOS.
# SD v2 style: gelu, eos_token_id = the real EOS id (pool at first EOS), pad "!" = 0, penultimate.
STYLES = {
    "v1": dict(hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1, pad="<|endoftext|>",
               hidden_layer="last"),
    "v2": dict(hidden_act="gelu", bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=0, pad="!",
               hidden_layer="penultimate"),
}


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_clip_tokenizer")
    return {style: write_tiny_clip_tokenizer(root / style, pad_token=s["pad"]) for style, s in STYLES.items()}


def _tiny_reference(style):
    s = STYLES[style]
    config = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act=s["hidden_act"],
                            layer_norm_eps=1e-5, bos_token_id=s["bos_token_id"], eos_token_id=s["eos_token_id"],
                            pad_token_id=s["pad_token_id"])
    config._attn_implementation = "eager"
    torch.manual_seed(0 if style == "v1" else 1)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(STYLES))
def case(request, tok_dirs):
    """(style, reference torch model, token ids [B, 77], flax model, converted params, flax outputs)."""
    style = request.param
    ref = _tiny_reference(style)
    ids = PromptTokenizer.from_pretrained(tok_dirs[style])(PROMPTS)
    model = clip_text_from_config(ref.config.to_dict(), hidden_layer=STYLES[style]["hidden_layer"],
                                  attention_impl="xla")
    target = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]
    params = clip_text_params_from_torch(ref.state_dict(), target)
    out = jax.jit(model.apply)({"params": params}, ids)
    return style, ref, ids, model, params, out


def _reference_outputs(ref, ids):
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
        n_layers = ref.config.num_hidden_layers
        assert len(out.hidden_states) == n_layers + 1  # embeddings + every layer
        final_ln = getattr(ref, "text_model", ref).final_layer_norm
        penultimate = final_ln(out.hidden_states[-2])
    return out.last_hidden_state.numpy(), penultimate.numpy(), out.pooler_output.numpy()


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_matches_transformers(case):
    style, ref, ids, model, params, out = case
    last, pen, pooled = _reference_outputs(ref, ids)
    assert out.last_hidden_state.shape == (len(PROMPTS), 77, 32) and out.pooler_output.shape == (len(PROMPTS), 32)
    errs = {"last": _max_err(out.last_hidden_state, last), "penultimate": _max_err(out.penultimate, pen),
            "pooled": _max_err(out.pooler_output, pooled)}
    print(style, "max abs err", errs)
    assert max(errs.values()) <= TOL, errs
    # The layers differ, so the test would notice penultimate/last being swapped.
    assert _max_err(last, pen) > 100 * TOL
    expected_context = last if STYLES[style]["hidden_layer"] == "last" else pen
    assert _max_err(out.context, expected_context) <= TOL
    # Pooling position: the real EOS is the first EOS and, in this vocab as in CLIP's, the highest id.
    eos_pos = np.argmax(ids == EOS_TOKEN_ID, axis=1)
    np.testing.assert_array_equal(eos_pos, np.argmax(ids, axis=1))
    np.testing.assert_allclose(out.pooler_output, last[np.arange(len(ids)), eos_pos], atol=TOL, rtol=0)


def test_pooling_rule_on_random_ids(case):
    """Ids where the highest id is not the first EOS tell the legacy (argmax) rule from first-EOS."""
    style, ref, _, model, params, _ = case
    rng = np.random.default_rng(3)
    ids = rng.integers(3, EOS_TOKEN_ID, (len(PROMPTS), 77)).astype(np.int32)
    ids[:, [9, 40]] = EOS_TOKEN_ID - 1  # the highest id in each row, before any EOS
    ids[:, [20, 30]] = EOS_TOKEN_ID if style == "v2" else 2
    _, _, pooled = _reference_outputs(ref, ids)
    pos = 9 if style == "v1" else 20
    out = jax.jit(model.apply)({"params": params}, ids)
    np.testing.assert_allclose(out.pooler_output, out.last_hidden_state[:, pos], atol=0, rtol=0)
    assert _max_err(out.pooler_output, pooled) <= TOL


def test_attention_impls_agree(case):
    _, _, ids, model, params, out = case
    other = model.clone(attention_impl="dot_product").apply({"params": params}, ids)
    assert _max_err(other.context, out.context) <= TOL


def test_param_names_round_trip(case):
    _, ref, _, _, params, _ = case
    ref_keys = {k if k.startswith("text_model.") else f"text_model.{k}" for k in ref.state_dict()}
    ref_keys = {k for k in ref_keys if not k.endswith("position_ids")}
    back = flax_to_torch(params)
    assert set(back) == ref_keys
    sd = ref.state_dict()
    key = "encoder.layers.1.self_attn.q_proj.weight"
    torch_key = key if key in sd else f"text_model.{key}"
    np.testing.assert_array_equal(back[f"text_model.{key}"], sd[torch_key].numpy())


def test_prefixed_state_dict_and_errors(case):
    _, ref, ids, model, params, _ = case
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    sd = {k if k.startswith("text_model.") else f"text_model.{k}": v.numpy() for k, v in ref.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = np.arange(77)[None]  # buffer of older checkpoints: ignored
    again = clip_text_params_from_torch(sd, target)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
    del sd["text_model.final_layer_norm.bias"]
    with pytest.raises(WeightsError, match="final_layer_norm.bias"):
        clip_text_params_from_torch(sd, target)


def test_tokenizer_matches_pipeline_call(tok_dirs):
    for style, path in tok_dirs.items():
        hf = CLIPTokenizer.from_pretrained(path)
        ours = PromptTokenizer.from_pretrained(path)
        got = ours(PROMPTS)
        want = hf(PROMPTS, padding="max_length", max_length=hf.model_max_length, truncation=True,
                  return_tensors="np").input_ids
        assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ours(PROMPTS[0]), got[:1])
        pad = hf.pad_token_id
        assert pad == (EOS_TOKEN_ID if style == "v1" else 0)
        np.testing.assert_array_equal(ours("")[0], [BOS_TOKEN_ID, EOS_TOKEN_ID] + [pad] * 75)
        assert ours.max_length == 77 and ours.vocab_size == VOCAB_SIZE
    with pytest.raises(ValueError, match="string"):
        ours(["a cat", 3])


def test_long_prompt_warns_and_truncates(tok_dirs):
    ours = PromptTokenizer.from_pretrained(tok_dirs["v1"])
    hf = ours.tokenizer
    n_full = len(hf(LONG_PROMPT).input_ids)
    assert n_full > 77
    with pytest.warns(UserWarning, match=rf"{n_full - 77} token\(s\) were dropped"):
        got = ours(["a cat", LONG_PROMPT])
    assert got.shape == (2, 77) and got[1, 0] == BOS_TOKEN_ID and got[1, -1] == EOS_TOKEN_ID
    want = hf([LONG_PROMPT], padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(got[1:], want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(PROMPTS)  # no warning for prompts that fit
    assert ours.truncation("a cat") is None and f"{n_full - 77} token(s) were dropped" in ours.truncation(LONG_PROMPT)


def test_tokenizer_is_safe_across_threads(tok_dirs):
    """A server tokenizes in its request handlers and its batch worker at once: the fast tokenizer's
    per-call padding / truncation settings must not leak from one call into another."""
    import concurrent.futures
    import pickle

    ours = PromptTokenizer.from_pretrained(tok_dirs["v1"])
    want = ours(["a cat"] * 3)

    def work(k):
        for _ in range(150):
            if k % 2:
                assert ours.truncation("a cat on a mat") is None
            else:
                np.testing.assert_array_equal(ours(["a cat"] * 3), want)
        return True

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert all(pool.map(work, range(8)))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ours))(["a cat"] * 3), want)  # data-loader copies


def test_config_json_and_bad_inputs(case, tmp_path):
    _, ref, ids, model, _, _ = case
    ref.config.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        raw = json.load(f)
    assert "architectures" in raw or "model_type" in raw  # unknown keys present and dropped
    loaded = clip_text_from_config(tmp_path, hidden_layer=model.hidden_layer, attention_impl="xla")
    assert loaded == model
    with pytest.raises(ValueError, match="hidden_layer"):
        CLIPTextModel(**{**_fields(model), "hidden_layer": "middle"}).init(jax.random.PRNGKey(0), ids)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match="integer input_ids"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.float32))


def _fields(model):
    return {k: getattr(model, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "max_position_embeddings", "hidden_act")}


def _config(name):
    return load_config(os.path.join(ROOT, "ldm_jax", "configs", f"{name}.py"))


def _count_flax(text_cfg):
    model = clip_text_from_config(dict(text_cfg))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def _count_transformers(text_cfg):
    cfg = {k: v for k, v in dict(text_cfg).items() if k != "hidden_layer"}
    with torch.device("meta"):
        model = transformers.CLIPTextModel(CLIPTextConfig(**cfg))
    return sum(p.numel() for p in model.parameters())


def test_full_size_parameter_counts():
    v1 = _config('sd_v1').text_encoder
    assert _count_flax(v1) == 123_060_480 == _count_transformers(v1)
    v2 = _config('sd_v2').text_encoder
    n2 = _count_flax(v2)
    print("SD v2 text encoder params", n2)
    assert n2 == _count_transformers(v2)


def test_tiny_config_fits_tiny_tokenizer(tok_dirs):
    cfg = _config('tiny').text_encoder
    assert cfg.vocab_size >= VOCAB_SIZE and cfg.max_position_embeddings == 77
    model = clip_text_from_config(dict(cfg))
    ids = PromptTokenizer.from_pretrained(tok_dirs["v1"])(PROMPTS[:2])
    out = jax.eval_shape(lambda i: model.init_with_output(jax.random.PRNGKey(0), i)[0], ids)
    assert out.context.shape == (2, 77, cfg.hidden_size)
