"""Noise schedules and samplers against diffusers' PyTorch schedulers.

Every sampler is stepped, in ``jax.jit`` + ``lax.fori_loop`` (traced step index), on the
trajectory of a fixed "model" ``0.9 * x + 0.1 * sin(t / 100)`` that feeds the sample back, and
compared with the diffusers scheduler stepped on the same model and the same injected noise.
The model is roughly an eps-predictor for data near 0, so trajectories stay O(1) and a 1e-5
absolute bound is ~10 float32 ulps (a model far from any denoiser, e.g. ``0.1 * x + sin(t/100)``,
blows eps-prediction samples up to ~40 where float32 rounding alone exceeds 1e-5).
Schedulers are elementwise, so both sides use the same [B, H, W, C] array.
"""
import contextlib
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from ldm_jax import diffusion
from ldm_jax.diffusion import schedules

SHAPE = (2, 8, 8, 4)
STEPS = 20
TOL = 1e-5
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

# name -> (diffusers class, extra diffusers kwargs, whether its step draws noise with randn_tensor)
REFERENCE = {
    "ddpm": (DDPMScheduler, dict(clip_sample=False), True),
    "ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False), False),
    "pndm": (PNDMScheduler, dict(skip_prk_steps=True, set_alpha_to_one=False), False),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2),
        False,
    ),
    "euler": (EulerDiscreteScheduler, {}, False),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, True),
}


def model_jax(x, t):
    return 0.9 * x + 0.1 * jnp.sin(t / 100)


def model_torch(x, t):
    return 0.9 * x + 0.1 * torch.sin(t / 100)


@functools.partial(jax.jit, static_argnums=3)
def run_loop(sampler, x, noises, start):
    """The sampling loop as a pipeline writes it; ``i`` is traced. ``noises``: [num_steps, *x]."""

    def body(i, carry):
        x, state = carry
        out = model_jax(sampler.scale_model_input(state, x, i), sampler.timesteps[i])
        return sampler.step(state, out, x, i, noises[i])

    return lax.fori_loop(start, sampler.num_steps, body, (x, sampler.init(x)))[0]


def build(name, prediction_type, spacing, zero_snr=False, **opts):
    """Our sampler and the matching diffusers scheduler (timesteps set)."""
    cls, ref_kwargs, _ = REFERENCE[name]
    cfg = dict(SD, prediction_type=prediction_type, steps_offset=1)
    if zero_snr:
        cfg["rescale_betas_zero_snr"] = True
    sampler = diffusion.get_sampler(
        name, diffusion.make_schedule(**cfg), STEPS, timestep_spacing=spacing, steps_offset=1, **opts
    )
    ref_opts = {k: v for k, v in opts.items() if k != "eta"}  # eta is a DDIM step() argument
    ref = cls(**cfg, timestep_spacing=spacing, **ref_kwargs, **ref_opts)
    ref.set_timesteps(STEPS)
    return sampler, ref


def step_noises(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n,) + SHAPE).astype(np.float32)


def reference_loop(name, ref, x, noises, start=0, eta=0.0):
    """diffusers' sampling loop (as its pipelines run it) with injected noise."""
    _, _, draws_noise = REFERENCE[name]
    x = torch.from_numpy(np.asarray(x))
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start)
    queue = [torch.from_numpy(noises[i]) for i in range(start, len(ref.timesteps))]
    draws = []

    def injected_noise(*args, **kwargs):
        draws.append(len(queue))
        return queue[0]

    # Patch the globals that ``step`` itself reads (its module's namespace), so the injected noise
    # reaches diffusers whichever module object the class was imported through.
    patch = (
        mock.patch.dict(type(ref).step.__globals__, {"randn_tensor": injected_noise})
        if draws_noise else contextlib.nullcontext()
    )
    with patch:
        for t in ref.timesteps[start:]:
            out = model_torch(ref.scale_model_input(x, t), t)
            kwargs = dict(eta=eta, variance_noise=queue[0]) if name == "ddim" else {}
            x = ref.step(out, t, x, **kwargs).prev_sample
            queue.pop(0)
    if draws_noise:
        # DDPM draws no noise at its last step (t = 0); the others draw at every step
        assert len(draws) >= len(ref.timesteps[start:]) - 1 and draws, f"the injected noise was drawn {len(draws)} times"
    return x.numpy()


def check_timesteps_and_sigmas(sampler, ref, zero_snr=False):
    ts = np.asarray(sampler.timesteps)
    if np.issubdtype(ts.dtype, np.integer):
        np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    else:
        # Fractional (Karras-Euler) timesteps come from diffusers' float32 sigma table, made with
        # torch's float32 sqrt, which is not correctly rounded (1 ulp off in ~20% of entries).
        np.testing.assert_allclose(ts, ref.timesteps.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(sampler.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-7)
    if hasattr(sampler, "sigmas"):
        # Zero-SNR betas carry that sqrt ulp too (see test_schedule_matches_diffusers).
        rtol = 5e-6 if zero_snr else 1e-6
        np.testing.assert_allclose(np.asarray(sampler.sigmas), ref.sigmas.numpy(), rtol=rtol)


CASES = [
    # (sampler, prediction_type, timestep_spacing, options)
    ("ddpm", "epsilon", "leading", {}),
    ("ddpm", "v_prediction", "leading", {}),
    ("ddpm", "epsilon", "trailing", {}),
    *[("ddim", p, s, {}) for p in ("epsilon", "v_prediction") for s in ("leading", "trailing", "linspace")],
    ("ddim", "epsilon", "leading", dict(eta=0.7)),
    ("ddim", "v_prediction", "trailing", dict(eta=1.0)),
    ("ddim", "v_prediction", "trailing", dict(zero_snr=True)),
    ("ddim", "v_prediction", "trailing", dict(zero_snr=True, eta=0.5)),
    ("pndm", "epsilon", "leading", {}),
    ("pndm", "v_prediction", "leading", {}),
    ("pndm", "epsilon", "linspace", {}),
    ("pndm", "epsilon", "trailing", {}),
    ("dpmpp_2m", "epsilon", "linspace", {}),
    ("dpmpp_2m", "v_prediction", "linspace", {}),
    ("dpmpp_2m", "epsilon", "leading", dict(use_karras_sigmas=True)),
    ("dpmpp_2m", "v_prediction", "linspace", dict(use_karras_sigmas=True)),
    ("dpmpp_2m", "epsilon", "leading", {}),
    ("dpmpp_2m", "v_prediction", "trailing", dict(zero_snr=True)),
    *[("euler", p, s, {}) for p in ("epsilon", "v_prediction") for s in ("leading", "trailing", "linspace")],
    ("euler", "epsilon", "leading", dict(use_karras_sigmas=True)),
    ("euler", "v_prediction", "trailing", dict(zero_snr=True)),
    ("euler_a", "epsilon", "linspace", {}),
    ("euler_a", "v_prediction", "leading", {}),
    ("euler_a", "epsilon", "trailing", {}),
]


def _case_id(case):
    name, pred, spacing, opts = case
    return "-".join([name, pred[:3], spacing] + [f"{k}={v}" for k, v in opts.items()])


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_trajectory_matches_diffusers(case):
    name, pred, spacing, opts = case
    opts = dict(opts)
    zero_snr = opts.pop("zero_snr", False)
    eta = opts.get("eta", 0.0)
    sampler, ref = build(name, pred, spacing, zero_snr=zero_snr, **opts)

    check_timesteps_and_sigmas(sampler, ref, zero_snr)

    noises = step_noises(sampler.num_steps)
    x_T = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    x_T = x_T * np.float32(sampler.init_noise_sigma)
    ours = np.asarray(run_loop(sampler, jnp.asarray(x_T), jnp.asarray(noises), 0))
    theirs = reference_loop(name, ref, x_T, noises, eta=eta)
    assert np.all(np.isfinite(ours))
    err = np.max(np.abs(ours - theirs))
    assert err <= TOL, f"max abs diff {err:.3g} (output scale {np.max(np.abs(theirs)):.3g})"


@pytest.mark.parametrize(
    "name,opts",
    [("ddim", {}), ("pndm", {}), ("dpmpp_2m", dict(use_karras_sigmas=True)), ("euler", {}), ("euler_a", {})],
)
def test_img2img_start_matches_diffusers(name, opts):
    """SDEdit: noise x0 to the first remaining timestep, then denoise the remaining steps."""
    sampler, ref = build(name, "epsilon", "leading", **opts)
    strength = 0.6
    start = sampler.start_index(strength)
    init_timestep = min(int(STEPS * strength), STEPS)
    assert start == STEPS - init_timestep  # diffusers' get_timesteps, scheduler.order == 1

    x0, noise = np.random.default_rng(2).standard_normal((2,) + SHAPE).astype(np.float32)
    ours_start = np.asarray(sampler.add_noise(jnp.asarray(x0), jnp.asarray(noise), start))
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start)
    theirs_start = ref.add_noise(
        torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[start : start + 1]
    ).numpy()
    np.testing.assert_allclose(ours_start, theirs_start, atol=TOL, rtol=0)

    noises = step_noises(sampler.num_steps, seed=4)
    ours = np.asarray(run_loop(sampler, jnp.asarray(ours_start), jnp.asarray(noises), start))
    theirs = reference_loop(name, ref, theirs_start, noises, start=start)
    err = np.max(np.abs(ours - theirs))
    assert err <= TOL, f"max abs diff {err:.3g}"


@pytest.mark.parametrize(
    "cfg",
    [
        dict(SD),
        dict(beta_schedule="linear"),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(SD, rescale_betas_zero_snr=True),
        dict(beta_schedule="linear", num_train_timesteps=50, beta_start=0.001, beta_end=0.05),
    ],
    ids=["scaled_linear", "linear", "cosine", "zero_snr", "short_linear"],
)
def test_schedule_matches_diffusers(cfg):
    ours = diffusion.make_schedule(**cfg, steps_offset=1, skip_prk_steps=True, _class_name="X")
    ref = DDPMScheduler(**cfg)
    zero_snr = cfg.get("rescale_betas_zero_snr", False)
    for field in ("betas", "alphas", "alphas_cumprod"):
        a = np.asarray(getattr(ours, field))
        assert a.dtype == np.float32
        if zero_snr:
            # PyTorch's vectorised float32 sqrt is not correctly rounded (1 ulp off numpy's),
            # and betas = 1 - ratio of neighbours amplifies that ulp where betas are tiny.
            np.testing.assert_allclose(a, getattr(ref, field).numpy(), rtol=0, atol=5e-6, err_msg=field)
        else:  # bit-exact: same float32 linspace (with FMA) and float64-accumulated cumprod.
            np.testing.assert_array_equal(a, getattr(ref, field).numpy(), err_msg=field)
    if zero_snr:
        assert float(ours.alphas_cumprod[-1]) == 0.0 == float(ref.alphas_cumprod[-1])


@pytest.fixture(scope="module")
def noisy_batch():
    x0, eps = jnp.asarray(np.random.default_rng(5).standard_normal((2,) + SHAPE), jnp.float32)
    t = jnp.array([3, 777], jnp.int32)
    return x0, eps, t


def test_add_noise_velocity_snr_match_diffusers(noisy_batch):
    x0, eps, t = noisy_batch
    sched = diffusion.make_schedule(**SD)
    ref = DDPMScheduler(**SD)
    tx0, teps, tt = (torch.from_numpy(np.asarray(a)) for a in (x0, eps, t))
    tt = tt.long()
    np.testing.assert_allclose(
        np.asarray(schedules.add_noise(sched, x0, eps, t)), ref.add_noise(tx0, teps, tt).numpy(), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(schedules.v_target(sched, x0, eps, t)), ref.get_velocity(tx0, teps, tt).numpy(), atol=1e-6
    )
    abar = ref.alphas_cumprod[tt].double()
    np.testing.assert_allclose(np.asarray(schedules.snr(sched, t)), (abar / (1 - abar)).numpy(), rtol=1e-5)
    # Scalar timestep broadcasts over the batch.
    np.testing.assert_allclose(
        np.asarray(schedules.add_noise(sched, x0, eps, 500)),
        ref.add_noise(tx0, teps, torch.tensor([500, 500])).numpy(),
        atol=1e-6,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predictions_invert_the_forward_process(noisy_batch, prediction_type):
    x0, eps, t = noisy_batch
    sched = diffusion.make_schedule(**SD, prediction_type=prediction_type)
    x_t = schedules.add_noise(sched, x0, eps, t)
    target = schedules.training_target(sched, x0, eps, t)
    np.testing.assert_allclose(np.asarray(schedules.predict_x0(sched, x_t, t, target)), x0, atol=1e-6)
    # eps from an x0 prediction divides by sqrt(1 - abar) ~ 0.06 at t=3 (amplifies rounding 18x).
    np.testing.assert_allclose(np.asarray(schedules.predict_eps(sched, x_t, t, target)), eps, atol=1e-5)


def test_denoise_helper_draws_fold_in_noise():
    """``denoise(rng=...)`` = the explicit loop fed ``normal(fold_in(rng, i))`` at step i."""
    sampler, _ = build("euler_a", "epsilon", "linspace")
    rng = jax.random.PRNGKey(7)
    x = jnp.asarray(np.random.default_rng(3).standard_normal(SHAPE), jnp.float32)
    steps = jnp.arange(sampler.num_steps)
    noises = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(rng, i), SHAPE))(steps)
    ours = jax.jit(lambda s, x: diffusion.denoise(s, model_jax, x, rng=rng, start=3))(sampler, x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(run_loop(sampler, x, noises, 3)), atol=1e-6)


@pytest.mark.parametrize("name", sorted(diffusion.SAMPLERS))
def test_low_precision_samples_keep_their_dtype(name):
    """bf16 latents/model outputs: float32 arithmetic inside, bf16 out, close to the f32 step."""
    sampler = diffusion.get_sampler(name, diffusion.make_schedule(**SD), 10)
    x = jnp.asarray(np.random.default_rng(6).standard_normal(SHAPE), jnp.float32)
    out, noise = 0.9 * x, 0.5 * x[::-1]
    state = sampler.init(x)
    for i in range(2):  # second step exercises the history buffers
        ref, ref_state = sampler.step(state, out, x, i, noise)
        low, _ = sampler.step(state, out.astype(jnp.bfloat16), x.astype(jnp.bfloat16), i, noise)
        assert low.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)
        x, state = ref, ref_state


def test_registry_aliases_and_defaults():
    sched = diffusion.make_schedule(**SD)
    assert set(diffusion.SAMPLERS) == {"ddpm", "ddim", "pndm", "dpmpp_2m", "euler", "euler_a"}
    for alias, name in [("plms", "pndm"), ("dpm++", "dpmpp_2m"), ("dpmsolver++", "dpmpp_2m")]:
        assert type(diffusion.get_sampler(alias, sched, 10)) is diffusion.SAMPLERS[name]
    s = diffusion.get_sampler_from_config("ddim", dict(SD, steps_offset=1, clip_sample=False), 50)
    np.testing.assert_array_equal(np.asarray(s.timesteps[:3]), [981, 961, 941])
    assert s.timesteps.dtype == jnp.int32
    assert diffusion.get_sampler("pndm", sched, 10).num_steps == 11


def test_bad_inputs():
    sched = diffusion.make_schedule(**SD)
    with pytest.raises(ValueError, match="ddim.*dpmpp_2m.*euler_a"):
        diffusion.get_sampler("heun", sched, 10)
    for steps in (0, -3):
        with pytest.raises(ValueError, match="num_inference_steps"):
            diffusion.get_sampler("ddim", sched, steps)
    with pytest.raises(ValueError, match="num_inference_steps"):
        diffusion.get_sampler("euler", sched, 1001)
    with pytest.raises(ValueError, match="timestep_spacing"):
        diffusion.get_sampler("ddim", sched, 10, timestep_spacing="uniform")
    with pytest.raises(ValueError, match="unknown option"):
        diffusion.get_sampler("euler", sched, 10, eta=0.5)
    with pytest.raises(ValueError, match="beta_schedule"):
        diffusion.make_schedule(beta_schedule="cubic")
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.make_schedule(prediction_type="noise")
    with pytest.raises(ValueError, match="skip_prk_steps"):
        diffusion.get_sampler("pndm", sched, 10, skip_prk_steps=False)
    with pytest.raises(ValueError, match="eta"):
        diffusion.get_sampler("ddim", sched, 10, eta=-1.0)
    sampler = diffusion.get_sampler("euler_a", sched, 10)
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        sampler.step(sampler.init(x), x, x, 0)
    with pytest.raises(ValueError, match="rng"):
        diffusion.denoise(sampler, model_jax, x)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            sampler.start_index(strength)
    with pytest.raises(ValueError, match="strength"):
        sampler.start_index(0.05)  # int(10 * 0.05) == 0 steps left
    assert sampler.start_index(1.0) == 0
