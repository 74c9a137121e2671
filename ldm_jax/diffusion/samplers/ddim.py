"""DDIM (Song et al. 2021): deterministic for ``eta = 0``, DDPM-like noise for ``eta > 0``."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from ldm_jax.diffusion.samplers.base import Sampler, gather, spaced_timesteps
from ldm_jax.diffusion.schedules import NoiseSchedule, x0_eps_from_output


class DDIMSampler(Sampler):
    """diffusers ``DDIMScheduler``. As there, the previous timestep is always
    ``t - num_train_timesteps // num_inference_steps`` (whatever the spacing) and a negative
    one means ``abar_prev = final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else abar_0;
    SD's released configs use ``set_alpha_to_one=False``, the default here)."""

    eta: float = struct.field(pytree_node=False)
    final_alpha_cumprod: float = struct.field(pytree_node=False)
    clip_sample: bool = struct.field(pytree_node=False)
    clip_sample_range: float = struct.field(pytree_node=False)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    @classmethod
    def _setup(cls, schedule: NoiseSchedule, n: int, spacing: str, steps_offset: int, eta: float = 0.0,
               set_alpha_to_one: bool = False, clip_sample: bool = False, clip_sample_range: float = 1.0) -> dict:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        ts = spaced_timesteps(schedule.num_train_timesteps, n, spacing, steps_offset).round().astype(np.int32)
        final = 1.0 if set_alpha_to_one else float(np.asarray(schedule.alphas_cumprod)[0])
        return dict(timesteps=jnp.asarray(ts), init_noise_sigma=1.0, eta=float(eta), final_alpha_cumprod=final,
                    clip_sample=bool(clip_sample), clip_sample_range=float(clip_sample_range))

    def step(self, state, model_output, sample, i, noise=None):
        dtype = sample.dtype
        x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        ac = self.schedule.alphas_cumprod
        t = gather(self.timesteps, i)
        prev_t = t - self.schedule.num_train_timesteps // self.num_inference_steps
        a_t = ac[t]
        a_prev = jnp.where(prev_t >= 0, gather(ac, prev_t), jnp.float32(self.final_alpha_cumprod))
        beta_t, beta_prev = 1 - a_t, 1 - a_prev

        x0, eps = x0_eps_from_output(self.prediction_type, x, out, a_t)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        variance = (beta_prev / beta_t) * (1 - a_t / a_prev)
        std = self.eta * variance**0.5
        prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            prev = prev + std * self._require_noise(noise)
        return prev.astype(dtype), state.replace(count=state.count + 1)
