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


def test_a_second_ctrl_c_aborts_and_the_signal_is_remembered():
    import signal

    import pytest

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
    try:
        with ckpt_lib.PreemptionGuard() as guard:
            assert guard.signum is None and not guard.should_stop()
            signal.raise_signal(signal.SIGINT)  # first Ctrl-C: save and stop at the end of the step
            assert guard.should_stop() and guard.signum == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):  # second: abort now
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # an ignored SIGINT stays ignored
        with ckpt_lib.PreemptionGuard() as guard:
            signal.raise_signal(signal.SIGINT)
            assert not guard.should_stop()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def test_retention_keeps_the_last_k_and_every_nth_only_after_a_newer_save_completed(tmp_path):
    mngr = ckpt_lib.CheckpointManager(str(tmp_path / "ckpt"), save_every=1, keep_last=2, keep_every=4)
    state = {"w": jnp.arange(4.0)}
    for step in range(1, 10):
        mngr.save(step, state, {"step": step})
        # an async save in flight never costs an older step: the one before it is still listed
        assert step - 1 in mngr.all_steps() or step == 1
    mngr.close()
    assert mngr.all_steps() == [4, 8, 9]  # ... 8 and 9 are the last two, 4 and 8 every 4th
