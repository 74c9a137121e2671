"""LDM's BERT text encoder (``LDMBertModel``) against diffusers' PyTorch one, and trained jointly with the UNet."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.ldm_bert import LDMBertModel
from ldm_jax.models.text_encoder import context_width, text_encoder_from_config
from signals import SigtermAt

TINY = dict(vocab_size=120, d_model=32, encoder_layers=2, encoder_ffn_dim=64, encoder_attention_heads=4, head_dim=12,
            max_position_embeddings=20)


def test_matches_diffusers_ldmbert():
    torch = pytest.importorskip("torch")
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel as TorchLDMBert

    from ldm_jax.convert.torch_flax import torch_to_flax

    torch.manual_seed(0)
    ref = TorchLDMBert(LDMBertConfig(**TINY)).eval()
    with torch.no_grad():  # non-trivial norms and biases (the init leaves them at 1 and 0)
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (3, 20))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    model = text_encoder_from_config(dict(TINY, model_type="ldmbert", architectures=["LDMBertModel"]))
    assert isinstance(model, LDMBertModel) and context_width(dict(TINY, model_type="ldmbert")) == 32
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 20), jnp.int32))["params"]
    sd = {k: v.numpy() for k, v in ref.state_dict().items() if not k.startswith("to_logits")}
    params = torch_to_flax(sd, target)
    out = model.apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(out.context), want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.context), np.asarray(out.last_hidden_state))


def test_bad_input():
    model = LDMBertModel(**TINY)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.init(jax.random.key(0), jnp.zeros((1, 21), jnp.int32))
    with pytest.raises(ValueError, match="integer input_ids"):
        model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="activation_function"):
        LDMBertModel(**dict(TINY, activation_function="swish")).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


# ----------------------------------------------------------------------------------------------
# Trained with the UNet (config.train.train_text_encoder)


def _joint_config(train_text: bool = True, **train):
    from ldm_jax.config_utils import load_config

    c = load_config("tiny_train")
    c.train.update(dict(progress=False, tensorboard=False, preview_every=0, log_every=1, train_text_encoder=train_text,
                        text_dropout=0.5, compiler_options={"xla_backend_optimization_level": 0}, **train))
    c.unet.update(dict(block_out_channels=(16,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                       norm_num_groups=4, cross_attention_dim=16, attention_head_dim=8))
    c.text_encoder = dict(model_type="ldmbert", vocab_size=100, d_model=16, encoder_layers=1, encoder_ffn_dim=32,
                          encoder_attention_heads=2, head_dim=8, max_position_embeddings=77)
    c.vae.update(dict(block_out_channels=(8,), norm_num_groups=4))
    c.data.num_classes = 4
    c.stages = [dict(resolution=8, steps=4, batch_size=8)]
    c.mesh = dict(data=2, fsdp=4)
    return c


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    from ldm_jax.train import diffusion_task as D

    work = str(tmp_path_factory.mktemp("joint"))
    state, hist = D.train(_joint_config(), work)
    return work, state, hist


def test_gradients_reach_the_text_encoder_and_resume_is_exact(joint_run, tmp_path):
    """The jointly trained encoder's params, EMA and AdamW state move (a frozen run's text encoder does
    not), and a run stopped by SIGTERM after 3 steps and resumed ends bit-identical, text encoder included."""
    from ldm_jax.train import diffusion_task as D
    from ldm_jax.train import sharding

    work, state, hist = joint_run
    assert set(state.params) == {"unet", "text_encoder"} and len(hist) == 4
    c = _joint_config()
    start = D.setup(c, sharding.make_mesh(c.mesh))
    assert start.aux["text"] is None  # not frozen: it is in the state
    before, after = _flat(start.state.params["text_encoder"]), _flat(state.params["text_encoder"])
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in before), "a text-encoder param did not train"
    assert any(np.abs(v).max() > 0 for v in _flat(state.opt_state).values())

    frozen_cfg = _joint_config(train_text=False)
    frozen = D.setup(frozen_cfg, sharding.make_mesh(frozen_cfg.mesh))
    text0 = _flat(frozen.aux["text"])
    st = frozen.state
    src = D.make_batch_source(frozen_cfg, D.get_stages(frozen_cfg)[0], (0, 8))
    for _ in range(2):
        st, _ = frozen.step_fn(st, sharding.make_global_batch(frozen.mesh, next(src), 8), frozen.aux)
    assert "text_encoder" not in st.params
    assert all(np.array_equal(v, _flat(frozen.aux["text"])[k]) for k, v in text0.items())

    split = str(tmp_path / "split")
    c = _joint_config(prefetch=1)  # the signal is keyed to reading a batch: no read-ahead
    src_fn = lambda config, stage, rows: SigtermAt(D.make_batch_source(config, stage, rows), at=2)  # noqa: E731
    first, h1 = D.train(c, split, batch_source_fn=src_fn)
    assert int(first.step) == 3  # the batch of step 2 was read with the signal: that step runs, then the save
    resumed, h2 = D.train(_joint_config(), split)
    assert [h["loss"] for h in h1 + h2] == [h["loss"] for h in hist]
    a, b = _flat((state.params, state.ema_params, state.opt_state)), _flat((resumed.params, resumed.ema_params,
                                                                             resumed.opt_state))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_the_workdir_samples_with_its_trained_text_encoder(joint_run, tmp_path):
    """The workdir loads as a model whose text encoder is the checkpoint's EMA one (no frozen copy is
    written); the pipeline samples with it; exporting to a diffusers folder is refused in one line."""
    from ldm_jax.convert import load_model
    from ldm_jax.convert.diffusers_folder import export_diffusers
    from ldm_jax.pipeline import StableDiffusionPipeline
    from ldm_jax.tiny_tokenizer import write_tiny_bert_tokenizer

    work, state, _ = joint_run
    import os

    assert not os.path.exists(os.path.join(work, "frozen", "text_encoder.safetensors"))
    loaded = load_model(work)
    want = _flat(state.ema_params["text_encoder"])
    got = _flat(loaded.params["text_encoder"])
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    tok_dir = write_tiny_bert_tokenizer(str(tmp_path / "tok"), words=["red", "circle", "blue", "square"])
    from ldm_jax.models.tokenizer import PromptTokenizer

    tok = PromptTokenizer.from_pretrained(tok_dir)
    ids = tok(["a red circle"])[0]
    assert ids[0] == tok.bos_token_id == 2 and tok.pad_token_id == 0 and list(ids).count(tok.eos_token_id) == 1
    pipe = StableDiffusionPipeline(loaded.config, loaded.params, tok)
    images = pipe(["red circle", "blue square"], num_inference_steps=3, guidance_scale=3.0, output_type="np")
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    with pytest.raises(ValueError, match="BERT text encoder"):
        export_diffusers(loaded, str(tmp_path / "out"))


def test_train_text_encoder_needs_the_whole_unet():
    from ldm_jax.train import diffusion_task as D

    c = _joint_config()
    c.train.trainable = "lora"
    with pytest.raises(ValueError, match="train_text_encoder"):
        D.trainable(c)


def test_a_tokenizer_bigger_than_the_embedding_table_is_refused(joint_run, tmp_path):
    from ldm_jax.convert import load_model
    from ldm_jax.models.tokenizer import PromptTokenizer
    from ldm_jax.pipeline import StableDiffusionPipeline
    from ldm_jax.tiny_tokenizer import write_tiny_bert_tokenizer

    loaded = load_model(joint_run[0])
    tok = PromptTokenizer.from_pretrained(write_tiny_bert_tokenizer(str(tmp_path / "tok"), words=[f"w{i}" for i in range(40)]))
    with pytest.raises(ValueError, match="embedding table 100 rows"):
        StableDiffusionPipeline(loaded.config, loaded.params, tok)


def test_the_text2face_recipes_build_and_name_their_vae():
    """celebahq_text2face and its tiny twin: the UNet reads LDMBert's context (shapes only, no weights);
    without released weights the run needs init.vae (the text encoder trains), and a bad one is one line."""
    from ldm_jax.config_utils import load_config
    from ldm_jax.train import diffusion_task as D
    from ldm_jax.train.pretrained import check_compatible, resolve_diffusion

    for name, side in (("celebahq_text2face", 64), ("tiny_text2face", 8)):
        c = load_config(name)
        check_compatible(c)
        models = D.build_models(c)
        ids = jnp.zeros((1, int(c.text_encoder.max_position_embeddings)), jnp.int32)
        ctx = jax.eval_shape(lambda: models.text_encoder.init(jax.random.key(0), ids))
        text_shape = jax.eval_shape(lambda p: models.text_encoder.apply(p, ids).context, ctx).shape
        assert text_shape == (1, ids.shape[1], c.unet.cross_attention_dim)
        out = jax.eval_shape(lambda: models.unet.init_with_output(
            jax.random.key(0), jnp.zeros((1, side, side, 3 if side == 64 else 4)), jnp.zeros((1,), jnp.int32),
            jnp.zeros(text_shape))[0])
        assert out.shape == (1, side, side, 3 if side == 64 else 4), name
        assert c.train.train_text_encoder and c.text_encoder.model_type == "ldmbert"
    c = load_config("tiny_text2face")
    with pytest.raises(ValueError, match="init.vae"):
        resolve_diffusion(c)
    c.init.vae = "/nonexistent/autoencoder"
    with pytest.raises(ValueError, match=r"config.init.vae='/nonexistent/autoencoder'.*does not exist"):
        resolve_diffusion(c)


def test_padding_left_out_of_the_cross_attention(tmp_path):
    """``text_encoder.zero_padding`` zeroes the context at the padding (the other positions as without it);
    a UNet with ``ignore_zero_context`` then gives the same output whatever zero vectors the context holds
    (a prompt is not averaged with its padding), one without does not. The tiny_text2face networks."""
    from ldm_jax.config_utils import load_config
    from ldm_jax.train import diffusion_task as D

    c = load_config("tiny_text2face")
    models = D.build_models(c)
    ids = jnp.asarray([[2, 17, 40, 9, 3] + [0] * 43, [2, 3] + [0] * 46], jnp.int32)  # [CLS] ... [SEP] [PAD]...
    te = models.text_encoder
    tp = te.init(jax.random.key(0), ids)
    ctx = te.apply(tp, ids).context
    plain = te.clone(zero_padding=False).apply(tp, ids).context
    pad = np.asarray(ids == 0)
    assert np.all(np.asarray(ctx)[pad] == 0) and np.all(np.abs(np.asarray(plain)[pad]).sum(-1) > 0)
    np.testing.assert_array_equal(np.asarray(ctx)[~pad], np.asarray(plain)[~pad])

    unet = models.unet
    x, t = jax.random.normal(jax.random.key(1), (2, 8, 8, 4)), jnp.asarray([10, 500])
    up = unet.init(jax.random.key(2), x, t, ctx)
    short = ctx[:, :5]  # the first prompt's tokens (the second's padding is still zero)
    np.testing.assert_allclose(unet.apply(up, x, t, ctx), unet.apply(up, x, t, short), atol=1e-5)
    blind = unet.clone(ignore_zero_context=False)
    assert float(jnp.abs(blind.apply(up, x, t, ctx) - blind.apply(up, x, t, short)).max()) > 1e-3


def test_zero_padding_needs_the_tokenizers_pad_id_and_no_diffusers_export(tmp_path):
    from ldm_jax.config_utils import load_config
    from ldm_jax.convert.diffusers_folder import export_diffusers
    from ldm_jax.tiny_tokenizer import write_tiny_bert_tokenizer
    from ldm_jax.train import diffusion_task as D

    c = load_config("tiny_text2face")
    c.tokenizer = write_tiny_bert_tokenizer(str(tmp_path / "tok"), words=["red", "hair"])
    D.check_zero_padding(c)  # [PAD] is 0, the encoder's pad_token_id
    c.text_encoder.pad_token_id = 5
    with pytest.raises(ValueError, match="pad_token_id=5 is not the tokenizer's padding id 0"):
        D.check_zero_padding(c)
    from ldm_jax.models.tokenizer import PromptTokenizer
    from ldm_jax.pipeline import StableDiffusionPipeline

    with pytest.raises(ValueError, match="pad_token_id=5 is not the tokenizer's padding id 0"):  # sampling too
        StableDiffusionPipeline(c, {}, PromptTokenizer.from_pretrained(c.tokenizer))
    cfg = {"unet": dict(load_config("tiny_text2face").unet), "vae": {}, "text_encoder": {"model_type": "clip"}}
    with pytest.raises(ValueError, match="ignore_zero_context"):
        export_diffusers(({"unet": {}, "vae": {}, "text_encoder": {}}, cfg), str(tmp_path / "out"))
