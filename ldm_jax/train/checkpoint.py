"""Checkpoints (orbax ``CheckpointManager``) and preemption handling, shared by the trainers.

A checkpoint step holds two items: ``state`` (any pytree of arrays: the train state, saved and
restored sharded) and ``meta`` (JSON: training stage, the data iterators' positions, ...). Saves
are asynchronous; orbax writes each step into a temporary directory and renames it when complete,
and only renamed (finished) steps are listed, so a crash or SIGKILL mid-save leaves the previous
checkpoint as the latest one. Restoring onto a different mesh: pass an abstract state whose
``ShapeDtypeStruct`` leaves carry the new shardings.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import signal
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax import storage

__all__ = ["CheckpointManager", "PreemptionGuard", "abstract_like", "allgather_json"]


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """``ShapeDtypeStruct`` tree (with ``shardings`` when given, else each array's own)."""
    if shardings is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _to_json(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__bytes__"}:
            return base64.b64decode(obj["__bytes__"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def allgather_json(obj: Any) -> list[Any]:
    """Every process's ``obj`` (JSON-serialisable, bytes allowed), in process order."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(_to_json(obj)).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(data.size))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [_from_json(json.loads(gathered[i, :int(n)].tobytes().decode())) for i, n in enumerate(sizes)]


class CheckpointManager:
    """Orbax manager with keep-last-k plus keep-every-n and a JSON ``meta`` item per step.

    Args:
      directory: where step folders go (created).
      save_every: save when ``step % save_every == 0`` (``save(..., force=True)`` always saves).
      keep_last: number of most recent checkpoints kept.
      keep_every: also keep every step divisible by this forever (None: off).
      async_save: write in a background thread (``wait()`` blocks until done).
      read_only: open existing checkpoints for reading only (:meth:`restore_subtree`); nothing is
        created, saved or cleaned up.
    """

    def __init__(self, directory: str, *, save_every: int = 1, keep_last: int = 3,
                 keep_every: int | None = None, async_save: bool = True, read_only: bool = False):
        if save_every <= 0 or keep_last <= 0:
            raise ValueError(f"save_every ({save_every}) and keep_last ({keep_last}) must be > 0")
        self.directory = os.fspath(storage.path(directory))  # local (absolute) or a cloud URL
        self.save_every = save_every
        self.read_only = read_only
        if read_only:  # partial restores of the state need the PyTree handler (same files)
            options = ocp.CheckpointManagerOptions(read_only=True)
            handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
            self._mngr = ocp.CheckpointManager(storage.path(directory), options=options, item_handlers=handlers)
            return
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep_last, keep_period=keep_every or None,
            create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(storage.path(directory), item_names=("state", "meta"), options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, meta: dict | None = None, force: bool = False) -> bool:
        """Start saving ``state`` and ``meta`` at ``step`` if due (or ``force``); returns whether it did."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(_to_json(meta or {})))
        return self._mngr.save(int(step), args=args, force=force)

    def save_or_stop(self, guard: "PreemptionGuard", step: int, state: Any, meta_fn: Callable[[], dict], *,
                     last: bool) -> bool:
        """End of a training step: save every ``save_every`` steps, at the ``last`` step and, forced,
        when ``guard`` saw a preemption signal; returns whether to stop (preempted).

        ``meta_fn()`` builds the metadata, only when saving. It may run a collective (e.g.
        :func:`allgather_json`): every process calls it at the same steps, as the decision depends
        on ``step``, ``last`` and ``guard.should_stop(step)`` only (the flag agrees over processes),
        so ``last`` must be the same on every process.
        """
        stop = guard.should_stop(step)
        if stop or last or step % self.save_every == 0:
            self.save(step, state, meta_fn(), force=stop or last)
        if stop:
            logging.warning("preempted: checkpoint at step %d written, stopping", step)
        return stop

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``(state, meta)`` of ``step`` (default latest) onto ``abstract_state``'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no complete checkpoint in {self.directory}")
        out = self._mngr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out.state, _from_json(dict(out.meta or {}))

    def state_tree(self, step: int) -> Any:
        """The saved state's tree of array metadata (shapes, dtypes) at ``step``, without reading arrays."""
        meta = self._mngr.item_metadata(int(step))["state"]
        return getattr(meta, "tree", meta)

    def restore_subtree(self, step: int, key: str) -> Any:
        """``state[key]`` of ``step`` as host numpy arrays (read-only managers): one part of a
        state dataclass, whatever mesh or device count the run had."""
        tree = self.state_tree(step)
        if not isinstance(tree, Mapping) or key not in tree:
            found = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise KeyError(f"checkpoint {step} in {self.directory!r} holds no {key!r} (found {found})")
        item = {key: tree[key]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        out = self._mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))
        return out.state[key]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        if self.read_only:
            self._mngr.close()
            return
        self._mngr.wait_until_finished()
        # Orbax removes leftover tmp directories (a save cut short by a crash) in a background thread
        # started by the constructor, and its close() does not wait for it: a manager opened and closed
        # just to read `latest_step` would race the next manager's cleanup of the same directory
        # (FileNotFoundError in rmtree). Wait for it here.
        await_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self._mngr.close()


class PreemptionGuard:
    """Turns SIGTERM (and optionally other signals) into a flag the training loop polls.

    ``with PreemptionGuard() as guard: ... if guard.should_stop(step): save and exit``. Multi-host:
    the flag is OR-ed over processes every ``check_every`` steps, so all of them stop at the same
    step. Handlers are only installed from the main thread; previous handlers are restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,), check_every: int = 1):
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.signals, self.check_every = signals, int(check_every)
        self._flag = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        logging.warning("received signal %d: saving a checkpoint and stopping", signum)
        self._flag = True

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def request(self) -> None:
        self._flag = True

    def should_stop(self, step: int | None = None) -> bool:
        """Whether a signal arrived. Multi-host, the answer is agreed over processes (a collective),
        so it is only asked at steps divisible by ``check_every`` (every process at the same steps):
        a preempted pod stops within ``check_every`` steps, and the other steps cost nothing."""
        if jax.process_count() == 1:
            return self._flag
        if step is not None and step % self.check_every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self._flag))))
