"""ldm_jax.train.writers.MetricsLog: the trainers' logging windows."""
import jax
import jax.numpy as jnp
import pytest

from ldm_jax.train.writers import MetricsLog


class FakeClock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def _metrics(loss, skipped=0):
    return {"loss": jnp.float32(loss), "skipped": jnp.int32(skipped)}


def test_images_per_s_counts_the_time_the_fetch_waits(monkeypatch):
    """The fetch blocks until the queued steps ran, so the window ends after it, not before."""
    clock = FakeClock()
    log = MetricsLog(clock=clock)
    real_get = jax.device_get

    def slow_get(x):  # the queued steps take 3 s to finish
        clock.t += 3.0
        return real_get(x)

    monkeypatch.setattr(jax, "device_get", slow_get)
    clock.t += 1.0  # dispatching the steps: 1 s
    log.add(1, _metrics(0.5), 4)
    log.add(2, _metrics(0.25), 4)
    m = log.flush()
    assert m["images_per_s"] == pytest.approx(8 / 4.0)  # not 8 / 1.0 (timed before the fetch)
    clock.t += 0.5  # the next window starts where this fetch ended
    log.add(3, _metrics(0.1), 6)
    assert log.flush()["images_per_s"] == pytest.approx(6 / 3.5)


def test_flush_returns_the_last_step_and_history_keeps_every_step():
    clock = FakeClock()
    log = MetricsLog(clock=clock)
    for step, loss in enumerate([4.0, 2.0, 1.0], start=1):
        log.add(step, _metrics(loss, skipped=step == 2), 2)
    clock.t += 2.0
    m = log.flush()
    assert m == {"loss": 1.0, "skipped": 0.0, "step": 3, "images_per_s": pytest.approx(3.0)}
    assert all(type(v) is float for k, v in m.items() if k != "step")
    log.add(4, _metrics(0.5), 2)
    log.add(5, _metrics(0.25), 2)  # still queued at close: fetched without a rate
    history = log.close()
    assert history == [{"loss": 4.0, "skipped": 0.0, "step": 1}, {"loss": 2.0, "skipped": 1.0, "step": 2},
                       {"loss": 1.0, "skipped": 0.0, "step": 3}, {"loss": 0.5, "skipped": 0.0, "step": 4},
                       {"loss": 0.25, "skipped": 0.0, "step": 5}]
    m["stage"] = 1  # the returned dict is the caller's: history is untouched
    assert "stage" not in history[2]
    assert log.flush() == {} and log.close() == history  # nothing queued


def test_rate_in_history_marks_each_windows_last_step():
    clock = FakeClock()
    log = MetricsLog(rate_in_history=True, clock=clock)
    log.add(1, _metrics(1.0), 5)
    log.add(2, _metrics(1.0), 5)
    clock.t += 5.0
    assert log.flush()["images_per_s"] == pytest.approx(2.0)
    log.add(3, _metrics(1.0), 5)
    history = log.close()
    assert ["images_per_s" in h for h in history] == [False, True, False]
    assert history[1]["images_per_s"] == pytest.approx(2.0)
