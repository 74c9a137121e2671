"""ldm_jax.train.checkpoint.CheckpointManager.save_or_stop: the trainers' end-of-step checkpointing."""
import logging

import jax.numpy as jnp
import numpy as np

from ldm_jax.train import checkpoint as ckpt_lib


def test_save_or_stop_saves_when_due_at_the_end_and_on_preemption(tmp_path, caplog):
    mngr = ckpt_lib.CheckpointManager(str(tmp_path / "ckpt"), save_every=3, keep_last=10, async_save=False)
    state = {"w": jnp.arange(4.0)}
    built = []

    def meta_fn():  # built lazily: only at the steps that save
        built.append(step)
        return {"step": step}

    with ckpt_lib.PreemptionGuard() as guard:
        for step in range(1, 6):
            assert not mngr.save_or_stop(guard, step, state, meta_fn, last=step == 5)
        assert built == [3, 5] and mngr.all_steps() == [3, 5]  # every 3rd step, and the last one
        guard.request()  # SIGTERM: step 7 is not due but is saved, then the loop stops
        with caplog.at_level(logging.WARNING):
            step = 7
            assert mngr.save_or_stop(guard, step, state, meta_fn, last=False)
    assert built == [3, 5, 7] and "preempted: checkpoint at step 7" in caplog.text
    restored, meta = mngr.restore(ckpt_lib.abstract_like(state))
    mngr.close()
    assert meta == {"step": 7}
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
