"""Checkpoints (orbax ``CheckpointManager``) and preemption handling, shared by the trainers.

A checkpoint step holds two items: ``state`` (any pytree of arrays: the train state, saved and
restored sharded) and ``meta`` (JSON: training stage, the data iterators' positions, ...). Saves
are asynchronous; orbax writes each step into a temporary directory and renames it when complete,
and only renamed (finished) steps are listed, so a crash or SIGKILL mid-save leaves the previous
checkpoint as the latest one. Restoring onto a different mesh: pass an abstract state whose
``ShapeDtypeStruct`` leaves carry the new shardings.

Integrity: a save that fails (disk full, permission, bucket) raises :class:`CheckpointSaveError` at
the next step of the loop (:meth:`CheckpointManager.poll`), after removing its own partial files;
old steps are only deleted once a newer save is known complete (orbax's own retention deletes them
even when the save that replaces them failed). :meth:`CheckpointManager.restore` falls back from a
checkpoint that does not restore to the newest one that does, and moves the bad one aside.
"""
from __future__ import annotations

import base64
import contextlib
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
from ldm_jax.errors import CheckpointRestoreError, CheckpointSaveError

__all__ = ["CheckpointManager", "CheckpointSaveError", "CheckpointRestoreError", "PreemptionGuard", "abstract_like",
           "allgather_json", "describe_error", "quiet_orbax"]

_TMP_MARK = ".orbax-checkpoint-tmp"  # orbax writes <step>.orbax-checkpoint-tmp-* and renames when complete
_BAD_MARK = ".unrestorable"  # a step that did not restore is renamed <step>.unrestorable-<n> (orbax ignores it)


def describe_error(e: BaseException) -> str:
    """One line for an I/O error: the errno's name for OS errors (ENOSPC: "no space left on device"),
    else the exception's type and first 300 characters (tensorstore's messages span many lines)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    text = " ".join(str(e).split())
    if "No space left on device" in text or "ENOSPC" in text or "os_error_code='28'" in text:
        return "no space left on device"
    if isinstance(e, PermissionError) or "Permission denied" in text:
        return f"permission denied ({text[:200]})"
    return f"{type(e).__name__}: {text[:300]}"


@contextlib.contextmanager
def quiet_orbax(level: int = logging.ERROR):
    """Orbax (absl) logs below ``level`` dropped: its warnings about read-only managers, or (at
    ``logging.CRITICAL``) its one line per unreadable array of a damaged step, which the caller reports once."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


class _SaveFailures(logging.Handler):
    """Orbax finishes async saves in a background thread that logs a failed commit and goes on (the
    error never reaches the caller); this handler keeps the first such error for the main thread."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.error: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.error is None and record.exc_info and "orbax" in record.pathname:
            self.error = record.exc_info[1]


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
        self.keep_last, self.keep_every = int(keep_last), keep_every or None
        # max_to_keep=None: retention is ours (_prune), applied only after a newer save is complete.
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=None, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(storage.path(directory), item_names=("state", "meta"), options=options)
        self._pending: int | None = None  # the step of the save in flight (or finished but not yet checked)
        self._failures = _SaveFailures()
        for name in ("absl", "orbax"):
            logging.getLogger(name).addHandler(self._failures)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, meta: dict | None = None, force: bool = False) -> bool:
        """Start saving ``state`` and ``meta`` at ``step`` if due (or ``force``); returns whether it did.

        Raises :class:`CheckpointSaveError` when this save or the previous one failed."""
        if not force and not self._mngr.should_save(int(step)):
            return False
        self._settle()  # the previous save complete and checked, old steps pruned
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(_to_json(meta or {})))
        try:
            saved = self._mngr.save(int(step), args=args, force=True)
        except Exception as e:  # noqa: BLE001 - the synchronous part: creating folders, serialising
            self._fail(int(step), e)
        if saved:
            self._pending = int(step)
            if not self._mngr.is_saving_in_progress():  # synchronous saves are complete here
                self._settle()
        return saved

    def poll(self) -> None:
        """Raise :class:`CheckpointSaveError` if the save in flight has failed (cheap: call every step)."""
        if self._pending is not None and self._failures.error is not None:
            self._settle()

    def _wait(self) -> BaseException | None:
        """Wait for orbax's save in flight; the error it raises (a failed commit), if any."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - tensorstore reports a full disk as ValueError(RESOURCE_EXHAUSTED)
            return e
        return None

    def _settle(self) -> None:
        """Wait for the save in flight; raise if it failed, else apply the retention policy."""
        error = self._wait()
        if self._pending is None:
            if error is not None:
                raise error
            return
        step, self._pending = self._pending, None
        error = error or self._failures.error
        if error is not None:
            self._fail(step, error)
        self._mngr.reload()
        if step not in self._mngr.all_steps():
            self._fail(step, RuntimeError("the save did not complete (no finished step folder)"))
        self._prune()

    def _prune(self) -> None:
        steps = sorted(self._mngr.all_steps())
        keep = set(steps[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for s in steps:
            if s not in keep:
                self._mngr.delete(s)

    def _fail(self, step: int, error: BaseException):
        """Remove this manager's partial files (freeing the space they hold) and raise one line."""
        self._pending, self._failures.error = None, None
        freed = self._remove_partial()
        self._mngr.reload()
        kept = self.all_steps()
        raise CheckpointSaveError(
            f"checkpoint of step {step} could not be written to {self.directory}: {describe_error(error)}; "
            f"complete checkpoints kept: {kept or 'none'}" + (f"; removed its partial files ({freed})" if freed else "")
        ) from error

    def _remove_partial(self) -> str:
        if jax.process_index() != 0:
            return ""
        names = [n for n in storage.listdir(self.directory) if _TMP_MARK in n]
        for n in names:
            try:
                storage.path(storage.join(self.directory, n)).rmtree()
            except Exception as e:  # noqa: BLE001 - best effort: the error being reported matters more
                logging.warning("could not remove %s: %s", n, describe_error(e))
        return ", ".join(names)

    def save_or_stop(self, guard: "PreemptionGuard", step: int, state: Any, meta_fn: Callable[[], dict], *,
                     last: bool) -> bool:
        """End of a training step: save every ``save_every`` steps, at the ``last`` step and, forced,
        when ``guard`` saw a preemption signal; returns whether to stop (preempted).

        ``meta_fn()`` builds the metadata, only when saving. It may run a collective (e.g.
        :func:`allgather_json`): every process calls it at the same steps, as the decision depends
        on ``step``, ``last`` and ``guard.should_stop(step)`` only (the flag agrees over processes),
        so ``last`` must be the same on every process.
        """
        self.poll()
        stop = guard.should_stop(step)
        if stop or last or step % self.save_every == 0:
            self.save(step, state, meta_fn(), force=stop or last)
        if stop:
            logging.warning("preempted: checkpoint at step %d written, stopping", step)
        return stop

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``(state, meta)`` of ``step`` onto ``abstract_state``'s shardings.

        ``step=None``: the newest checkpoint that restores. One that does not (truncated, corrupt) is
        skipped with a warning naming it and why, and (when not read-only) renamed
        ``<step>.unrestorable-<n>`` so that the resumed run can save that step again.
        Raises :class:`CheckpointRestoreError` when none restores."""
        if step is not None:
            return self._restore_step(abstract_state, int(step))
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointRestoreError(f"no complete checkpoint in {self.directory}")
        reasons = []
        for s in steps:
            try:
                out, error = self._restore_step(abstract_state, s), None
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
                out, error = None, e
            ok = error is None
            if jax.process_count() > 1:  # every process restores the same step
                ok = all(allgather_json(ok))
            if ok:
                return out
            why = describe_error(error) if error is not None else "it failed on another process"
            reasons.append(f"step {s}: {why}")
            logging.warning("checkpoint of step %d in %s does not restore (%s): trying the one before it",
                            s, self.directory, why)
            self._quarantine(s)
        raise CheckpointRestoreError(f"no checkpoint in {self.directory} restores: " + "; ".join(reasons))

    def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, dict]:
        with quiet_orbax(logging.CRITICAL):
            out = self._mngr.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out.state, _from_json(dict(out.meta or {}))

    def _quarantine(self, step: int) -> None:
        if self.read_only:
            return
        if jax.process_index() == 0:
            names = set(storage.listdir(self.directory))
            n = 0
            while f"{step}{_BAD_MARK}-{n}" in names:
                n += 1
            src = storage.path(storage.join(self.directory, str(step)))
            src.rename(storage.path(storage.join(self.directory, f"{step}{_BAD_MARK}-{n}")))
            logging.warning("moved it aside to %s%s-%d", step, _BAD_MARK, n)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"ldm_jax_quarantine_{step}")
        self._mngr.reload()

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
        """Block until the save in flight is complete; raises :class:`CheckpointSaveError` if it failed."""
        if self.read_only:
            return
        self._settle()

    def close(self) -> None:
        """Finish the save in flight (raising if it failed) and release the manager."""
        if self.read_only:
            self._mngr.close()
            return
        try:
            self._settle()
        finally:
            self._release()

    def _release(self) -> None:
        for name in ("absl", "orbax"):
            logging.getLogger(name).removeHandler(self._failures)
        self._wait()  # an error here was reported by _settle already
        # Orbax removes leftover tmp directories (a save cut short by a crash) in a background thread
        # started by the constructor, and its close() does not wait for it: a manager opened and closed
        # just to read `latest_step` would race the next manager's cleanup of the same directory
        # (FileNotFoundError in rmtree). Wait for it here.
        await_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        try:
            self._mngr.close()
        except Exception as e:  # noqa: BLE001 - a failed save, already raised as CheckpointSaveError by _settle
            logging.debug("closing the checkpoint manager: %s", e)


class PreemptionGuard:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the training loop polls.

    ``with PreemptionGuard() as guard: ... if guard.should_stop(step): save and exit``. The first
    signal asks for a checkpoint and a clean stop; a second SIGINT aborts at once (KeyboardInterrupt),
    as a user pressing Ctrl-C twice expects. ``signum`` is the signal that asked (None: none did).
    Multi-host: the flag is OR-ed over processes every ``check_every`` steps, so all of them stop at
    the same step. Handlers are only installed from the main thread; previous handlers are restored
    on exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), check_every: int = 1):
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.signals, self.check_every = signals, int(check_every)
        self._flag = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self._flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.warning("received %s: saving a checkpoint and stopping (Ctrl-C again aborts without saving)",
                        signal.Signals(signum).name)
        self._flag = True
        self.signum = signum

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                if signal.getsignal(s) is signal.SIG_IGN:  # e.g. SIGINT of a job started with `&`: stays ignored
                    continue
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a checkpoint and a stop, as ``signum`` would."""
        self._flag = True
        self.signum = signum

    def should_stop(self, step: int | None = None) -> bool:
        """Whether a signal arrived. Multi-host, the answer is agreed over processes (a collective),
        so it is only asked at steps divisible by ``check_every`` (every process at the same steps):
        a preempted pod stops within ``check_every`` steps, and the other steps cost nothing."""
        if jax.process_count() == 1:
            return self._flag
        if step is not None and step % self.check_every:
            return False
        from jax.experimental import multihost_utils

        stop = bool(np.any(multihost_utils.process_allgather(np.int32(self._flag))))
        if stop and self.signum is None:  # another process was signalled: this one stops as preempted too
            self._flag, self.signum = True, signal.SIGTERM
        return stop
