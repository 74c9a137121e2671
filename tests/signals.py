"""A batch source that stops a training run the way a preemption does: SIGTERM to this process."""
import os
import signal


class SigtermAt:
    """Wraps a batch source; sends this process SIGTERM when it yields the batch of a global step in
    ``at`` (an int or a set; the loop then runs that step, saves and stops). ``first_step``: the global
    step of the source's first batch (a later stage's source starts there). ``global_steps=False``:
    ``at`` counts the batches this source has read instead (a resumed position does not count)."""

    def __init__(self, inner, at, first_step: int = 0, global_steps: bool = True):
        self.inner, self.step, self.global_steps = inner, first_step, global_steps
        self.at = {at} if isinstance(at, int) else set(at)

    def __iter__(self):
        return self

    def __next__(self):
        if self.step in self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.step += 1
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, s):
        self.inner.set_state(s)
        if self.global_steps:
            self.step += int(s["position"])
