"""DDPM ancestral sampling (Ho et al. 2020) with the "fixed_small" posterior variance."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from ldm_jax.diffusion.samplers.base import Sampler, gather, spaced_timesteps
from ldm_jax.diffusion.schedules import NoiseSchedule, x0_eps_from_output


class DDPMSampler(Sampler):
    """diffusers ``DDPMScheduler`` (variance_type="fixed_small"); each step goes to the next
    timestep of the (spaced) list, the last one to ``abar = 1``. Noise is added for ``t > 0``."""

    prev_timesteps: jnp.ndarray  # int32 [num_steps], -1 after the last step
    clip_sample: bool = struct.field(pytree_node=False)
    clip_sample_range: float = struct.field(pytree_node=False)

    stochastic = True

    @classmethod
    def _setup(cls, schedule: NoiseSchedule, n: int, spacing: str, steps_offset: int, clip_sample: bool = False,
               clip_sample_range: float = 1.0) -> dict:
        ts = spaced_timesteps(schedule.num_train_timesteps, n, spacing, steps_offset).round().astype(np.int32)
        prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)
        return dict(timesteps=jnp.asarray(ts), init_noise_sigma=1.0, prev_timesteps=jnp.asarray(prev),
                    clip_sample=bool(clip_sample), clip_sample_range=float(clip_sample_range))

    def step(self, state, model_output, sample, i, noise=None):
        noise = self._require_noise(noise)
        dtype = sample.dtype
        x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        ac = self.schedule.alphas_cumprod
        t, prev_t = gather(self.timesteps, i), gather(self.prev_timesteps, i)
        a_t = ac[t]
        a_prev = jnp.where(prev_t >= 0, gather(ac, prev_t), 1.0)
        beta_t, beta_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha

        x0, _ = x0_eps_from_output(self.prediction_type, x, out, a_t)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        mean = (a_prev**0.5 * cur_beta) / beta_t * x0 + cur_alpha**0.5 * beta_prev / beta_t * x
        variance = jnp.maximum(beta_prev / beta_t * cur_beta, 1e-20)
        prev = mean + jnp.where(t > 0, variance**0.5, 0.0) * noise
        return prev.astype(dtype), state.replace(count=state.count + 1)
