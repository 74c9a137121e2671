"""Learning-rate schedules (SD's warm-up then constant; optional cosine decay) and the LDM EMA."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from ldm_jax.config_utils import load_config
from ldm_jax.train import autoencoder_task, optim
from ldm_jax.train.diffusion_task import make_optimizer


def test_warmup_then_constant():
    s = optim.learning_rate_schedule(1e-4, warmup_steps=10)
    np.testing.assert_allclose([float(s(n)) for n in (0, 5, 10, 10_000)], [0.0, 5e-5, 1e-4, 1e-4], rtol=1e-6)
    assert float(optim.learning_rate_schedule(3e-4)(12345)) == pytest.approx(3e-4)


@pytest.mark.parametrize("warmup", [0, 20])
def test_cosine_decay(warmup):
    lr, decay, final = 1e-3, 120, 0.1
    s = optim.learning_rate_schedule(lr, warmup, decay, final_fraction=final)
    for n in (warmup, warmup + 25, warmup + 50, decay - 1, decay, decay + 500):
        frac = min(1.0, (n - warmup) / (decay - warmup))
        want = final * lr + (lr - final * lr) * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(s(n)) == pytest.approx(want, rel=1e-5), n
    if warmup:
        assert float(s(0)) == 0.0 and float(s(warmup // 2)) == pytest.approx(lr / 2, rel=1e-6)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(lr=1e-3, warmup_steps=-1), dict(lr=1e-3, decay_steps=-5),
                                    dict(lr=1e-3, warmup_steps=10, decay_steps=10),
                                    dict(lr=1e-3, decay_steps=10, final_fraction=1.5)])
def test_bad_schedules_raise(kwargs):
    with pytest.raises(ValueError):
        optim.learning_rate_schedule(**kwargs)


def test_ema_decay_warmup_formula():
    for n in (1, 10, 100, 10_000):
        assert float(optim.ema_decay(n, 0.9999)) == pytest.approx(min(0.9999, (1 + n) / (10 + n)), rel=1e-6)
    assert float(optim.ema_decay(3, 0.99, warmup=False)) == pytest.approx(0.99)


def _adam_steps(tx, n, dim=3):
    """Run ``n`` updates of ``tx`` with a constant gradient; per-step parameter change (abs) [n]."""
    params = {"w": jnp.zeros((dim,))}
    state = tx.init(params)
    moves = []
    for _ in range(n):
        updates, state = tx.update({"w": jnp.ones((dim,))}, state, params)
        new = optax.apply_updates(params, updates)
        moves.append(float(jnp.abs(new["w"] - params["w"]).max()))
        params = new
    return np.asarray(moves)


def test_diffusion_optimizer_follows_decay():
    config = load_config("tiny_train")
    config.train.update(dict(lr=1e-2, warmup_steps=2, decay_steps=6, weight_decay=0.0))
    tx, schedule = make_optimizer(config)
    moves = _adam_steps(tx, 8)
    # Adam's step with a constant gradient is ~lr, so each move is the schedule's rate at that update
    np.testing.assert_allclose(moves, [float(schedule(n)) for n in range(8)], rtol=1e-3, atol=1e-9)
    assert moves[0] == 0.0 and moves[2] == pytest.approx(1e-2, rel=1e-3) and moves[6:].max() < 1e-9


def test_text_encoder_learning_rate_scale():
    """``train.text_encoder_lr_scale`` multiplies the jointly trained text encoder's steps (weight decay
    included), not the UNet's; 1 leaves the optimizer state as it was (old checkpoints restore)."""
    config = load_config("tiny_train")
    config.train.update(dict(lr=1e-2, warmup_steps=0, weight_decay=0.1, train_text_encoder=True))
    params = {"unet": {"w": jnp.full((3,), 2.0)}, "text_encoder": {"e": jnp.full((2,), 2.0)}}
    grads = jax.tree.map(jnp.ones_like, params)

    def step(scale):
        config.train.text_encoder_lr_scale = scale
        tx, _ = make_optimizer(config)
        return tx.update(grads, tx.init(params), params)

    base, base_state = step(1.0)
    scaled, scaled_state = step(4.0)
    np.testing.assert_allclose(scaled["unet"]["w"], base["unet"]["w"], rtol=1e-6)
    np.testing.assert_allclose(scaled["text_encoder"]["e"], 4.0 * base["text_encoder"]["e"], rtol=1e-6)
    assert float(base["text_encoder"]["e"][0]) == pytest.approx(-1e-2 * (1 + 0.1 * 2.0), rel=1e-3)  # adam + decay
    # a factor of 1 adds no state: the optimizer tree is the one checkpoints before the option hold
    plain = optim.make_optimizer(1e-2, weight_decay=0.1)
    assert jax.tree.structure(base_state) == jax.tree.structure(plain.init(params))


@pytest.mark.parametrize("train", [dict(text_encoder_lr_scale=2.0),  # the text encoder is frozen
                                   dict(text_encoder_lr_scale=0.0, train_text_encoder=True)])
def test_text_encoder_learning_rate_scale_needs_a_trained_encoder(train):
    from ldm_jax.train.diffusion_task import trainable

    config = load_config("tiny_train")
    config.train.update(train)
    with pytest.raises(ValueError, match="text_encoder_lr_scale"):
        trainable(config)


def test_autoencoder_optimizers_follow_decay():
    config = load_config("tiny_autoencoder")
    config.optim.update(dict(base_learning_rate=1e-2, scale_lr=False, decay_steps=4))
    config.train.batch_size = 1
    gen, disc = autoencoder_task.make_optimizers(config)
    want = [float(optim.learning_rate_schedule(1e-2, 0, 4)(n)) for n in range(6)]
    np.testing.assert_allclose(_adam_steps(disc, 6), want, rtol=1e-3, atol=1e-9)
    params = {"ae": {"w": jnp.zeros(2)}, "logvar": jnp.zeros(())}
    state = gen.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for n in range(6):
        updates, state = gen.update(grads, state, params)
        assert float(jnp.abs(updates["ae"]["w"]).max()) == pytest.approx(want[n], rel=1e-3, abs=1e-9)
        assert float(updates["logvar"]) == 0.0  # frozen (LDM)
    config.optim.decay_steps = 0
    constant = autoencoder_task.make_optimizers(config)[1]
    np.testing.assert_allclose(_adam_steps(constant, 4), 1e-2, rtol=1e-3)


def test_demo_stage_decay_option():
    from ldm_jax.examples.shapes_demo.demo import _decay_steps

    assert _decay_steps(ConfigDict(dict(steps=300, warmup_steps=0, lr_decay="constant"))) == 0
    assert _decay_steps(ConfigDict(dict(steps=300, warmup_steps=0, lr_decay="cosine"))) == 300
    with pytest.raises(ValueError, match="lr_decay"):
        _decay_steps(ConfigDict(dict(steps=300, warmup_steps=0, lr_decay="linear")))
    with pytest.raises(ValueError, match="warmup_steps"):
        _decay_steps(ConfigDict(dict(steps=30, warmup_steps=100, lr_decay="cosine")))


def test_first_moment_in_bfloat16():
    """``mu_dtype``: AdamW's first moment in bf16, the second in the parameters' float32."""
    params = {"w": jnp.ones((4, 3), jnp.float32)}
    state = optim.make_optimizer(1e-3, mu_dtype="bfloat16").init(params)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) == 2}
    assert dtypes == {"bfloat16", "float32"}
    default = optim.make_optimizer(1e-3).init(params)
    assert {str(x.dtype) for x in jax.tree.leaves(default) if getattr(x, "ndim", 0) == 2} == {"float32"}
