"""PLMS: the pseudo linear multistep part of PNDM (Liu et al. 2022), as SD samples with it."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from ldm_jax.diffusion.samplers.base import Sampler, gather, spaced_timesteps
from ldm_jax.diffusion.schedules import NoiseSchedule

# Adams-Bashforth weights over the eps buffer (oldest first) by number of stored outputs.
_AB_WEIGHTS = np.array(
    [
        [0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, -1.0 / 2, 3.0 / 2],
        [0.0, 5.0 / 12, -16.0 / 12, 23.0 / 12],
        [-9.0 / 24, 37.0 / 24, -59.0 / 24, 55.0 / 24],
    ],
    np.float32,
)


class PNDMSampler(Sampler):
    """diffusers ``PNDMScheduler(skip_prk_steps=True)``: ``num_inference_steps + 1`` model calls.

    Step 0 is an Euler step whose eps is kept; step 1 re-evaluates at the next timestep (listed
    twice in ``timesteps``) and redoes step 0 from the kept sample with the mean of both eps (a
    pseudo improved Euler step); later steps use Adams-Bashforth on the last 2-4 eps.
    """

    final_alpha_cumprod: float = struct.field(pytree_node=False)

    buffers = {"ets": (4,), "cur_sample": ()}

    @classmethod
    def _setup(cls, schedule: NoiseSchedule, n: int, spacing: str, steps_offset: int, set_alpha_to_one: bool = False,
               skip_prk_steps: bool = True) -> dict:
        if not skip_prk_steps:
            raise ValueError("only skip_prk_steps=True (PLMS, as Stable Diffusion uses) is supported")
        if schedule.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"PNDM supports prediction_type epsilon or v_prediction, got {schedule.prediction_type!r}"
            )
        ts = spaced_timesteps(schedule.num_train_timesteps, n, spacing, steps_offset)[::-1]
        ts = ts.round().astype(np.int32)  # ascending
        plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].astype(np.int32)
        final = 1.0 if set_alpha_to_one else float(np.asarray(schedule.alphas_cumprod)[0])
        return dict(timesteps=jnp.asarray(plms), init_noise_sigma=1.0, final_alpha_cumprod=final)

    def step(self, state, model_output, sample, i, noise=None):
        del noise
        dtype = sample.dtype
        x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        c = state.count
        ets, cur_sample = state.buffers["ets"], state.buffers["cur_sample"]
        ratio = self.schedule.num_train_timesteps // self.num_inference_steps
        t = gather(self.timesteps, i)

        # Step 1 repeats step 0's interval: from t + ratio down to t, starting at the kept sample.
        second = c == 1
        t_cur = jnp.where(second, t + ratio, t)
        prev_t = jnp.where(second, t, t - ratio)
        ets = jnp.where(second, ets, jnp.concatenate([ets[1:], out[None]], axis=0))
        n_ets = jnp.where(c <= 1, 1, jnp.minimum(c, 4))
        w = jnp.asarray(_AB_WEIGHTS)[n_ets - 1]
        eps = jnp.where(second, (out + ets[-1]) / 2, jnp.tensordot(w, ets, axes=1))
        x_used = jnp.where(second, cur_sample, x)
        cur_sample = jnp.where(c == 0, x, cur_sample)

        ac = self.schedule.alphas_cumprod
        a_t = gather(ac, t_cur)
        a_prev = jnp.where(prev_t >= 0, gather(ac, prev_t), jnp.float32(self.final_alpha_cumprod))
        beta_t, beta_prev = 1 - a_t, 1 - a_prev
        if self.prediction_type == "v_prediction":
            eps = a_t**0.5 * eps + beta_t**0.5 * x_used
        denom = a_t * beta_prev**0.5 + (a_t * beta_t * a_prev) ** 0.5
        prev = (a_prev / a_t) ** 0.5 * x_used - (a_prev - a_t) * eps / denom
        new_state = state.replace(count=c + 1, buffers={"ets": ets, "cur_sample": cur_sample})
        return prev.astype(dtype), new_state
