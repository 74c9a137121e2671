"""The one training loop: every task (diffusion, autoencoder, ...) plugs into :func:`train`.

A :class:`Task` gives the loop pure functions and data; the loop owns everything around them::

    task.init(key) -> (state, aux)                 jitted once, created directly sharded
    task.step(state, batch, aux) -> (state, metrics)   jitted once per batch shape, state donated
    task.batches(stage, rows, workdir) -> iterator of this process's rows, with get_state/set_state

``state`` is what training changes and what a checkpoint holds (a flax struct with ``step``);
``aux`` holds the frozen inputs of the step (pretrained encoders, LPIPS weights), sharded but never
saved. The loop starts ``jax.distributed`` when configured, builds the mesh, compiles (or reuses)
init and step, writes ``config.json`` and the task's model files into the workdir, restores the
latest checkpoint, feeds global batches stage by stage, logs metrics to TensorBoard and a progress
bar, writes previews, checkpoints every ``checkpoint_every`` steps with the data position, and
turns SIGTERM or Ctrl-C into a final checkpoint and a clean stop. A run stopped at step N and resumed
is bit-identical to an uninterrupted one.

Faults: one trainer per workdir (:class:`~ldm_jax.train.workdir.WorkdirLock`); a failed save stops
the run at once (:class:`~ldm_jax.train.checkpoint.CheckpointSaveError`), keeping every complete
checkpoint; a resumed run falls back from a checkpoint that does not restore to the one before it;
a diverged run (non-finite steps, ``train.max_consecutive_skipped`` / ``max_skipped_fraction``)
stops with :class:`TrainingDiverged` before it saves anything diverged.

Settings come from ``config.train`` (:func:`ldm_jax.configs.common.loop_config`), ``config.mesh``,
``config.sharding`` and ``config.distributed``.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from ldm_jax.configs.common import LOOP_KEYS
from ldm_jax.errors import TrainingDiverged
from ldm_jax.models.attention import on_mesh
from ldm_jax.runtime import enable_compilation_cache, jit_compiler_options
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.data.pipeline import DevicePrefetchIterator
from ldm_jax.train import distributed, sharding
from ldm_jax.train import workdir as workdir_lib
from ldm_jax.train.writers import MetricsLog, MetricWriter

__all__ = ["Stage", "Task", "Setup", "Programs", "programs", "TrainResult", "TrainingDiverged", "stage_index", "setup", "abstract_state",
           "compiler_options", "train"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage of training: ``steps`` steps of global batch ``batch_size`` at ``resolution`` px; ``index``
    is its place in the run's stages."""

    resolution: int
    steps: int
    batch_size: int
    index: int = 0


def stage_index(stages: Sequence[Stage], step: int | Array) -> int | Array:
    """Index of the stage that step ``step`` (0-based) belongs to (the last one past the end)."""
    bounds = np.cumsum([s.steps for s in stages])[:-1]
    if isinstance(step, (int, np.integer)):
        return int(np.searchsorted(bounds, step, side="right"))
    import jax.numpy as jnp

    return jnp.searchsorted(jnp.asarray(bounds, jnp.int32), step, side="right").astype(jnp.int32)


class Task:
    """What a kind of training gives the loop. Subclasses implement the methods that raise.

    ``config`` is the run's ConfigDict; ``name`` labels the progress bar; ``progress_keys`` are
    metrics shown next to the loss on the progress bar. A task's constructor must not run JAX
    computations: the loop starts ``jax.distributed`` first, then calls :meth:`start`.
    """

    name = "task"
    progress_keys: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config

    def start(self) -> None:
        """Called once before anything is built (after ``jax.distributed`` starts): load what the
        task starts from, resolve ``self.config``. Must be idempotent."""

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def init(self, key: Array) -> tuple[Any, Any]:
        """Pure ``key -> (state, aux)``: a fresh train state and the step's frozen inputs."""
        raise NotImplementedError

    def step(self, state, batch: dict, aux) -> tuple[Any, dict]:
        """Pure ``(state, batch, aux) -> (state, metrics)``; metrics are scalars."""
        raise NotImplementedError

    def batch_spec(self, stage: Stage) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch of ``stage`` as shapes and dtypes, reading no data (ahead-of-time compiles)."""
        raise NotImplementedError

    def batches(self, stage: Stage, rows: tuple[int, int], workdir: str | None) -> Iterator[dict]:
        """This process's ``rows`` of every global batch of ``stage``, numeric arrays only, with
        ``get_state()``/``set_state()``."""
        raise NotImplementedError

    def cache_key(self) -> Any:
        """What, besides the mesh, the compiled init and step depend on (hashable), or None to
        never reuse them. Default: the config without the loop's own settings."""
        cfg = self.config.to_dict()
        cfg = {k: v for k, v in cfg.items() if k not in ("name", "distributed")}
        cfg["train"] = {k: v for k, v in cfg.get("train", {}).items() if k not in LOOP_KEYS}
        default = lambda o: o.tolist() if isinstance(o, (np.ndarray, np.generic)) else repr(o)  # noqa: E731
        return (type(self), json.dumps(cfg, sort_keys=True, default=default))

    def state_shardings(self, abstract_state, mesh: Mesh) -> Any:
        """Shardings of the state: scalars and PRNG keys replicated, every other field by the
        config's sharding rules (FSDP over ``fsdp``)."""
        rep = sharding.replicated(mesh)
        fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
        return abstract_state.replace(**{
            k: rep if k == "rng" or all(np.ndim(x) == 0 for x in jax.tree.leaves(v))
            else sharding.config_param_shardings(v, mesh, self.config.sharding) for k, v in fields.items()})

    def aux_shardings(self, abstract_aux, mesh: Mesh) -> Any:
        return sharding.config_param_shardings(abstract_aux, mesh, self.config.sharding)

    def prepare_aux(self, aux, shardings) -> Any:
        """The aux the steps use, from the random one of :meth:`init` (e.g. pretrained weights in)."""
        return aux

    def prepare_state(self, state, shardings) -> Any:
        """The state a fresh run starts from, from the random one of :meth:`init` (e.g. pretrained
        weights to fine-tune); a resumed run restores its checkpoint instead."""
        return state

    def write_workdir(self, workdir: str, aux) -> None:
        """Model files beside the checkpoints (called on every process; see :mod:`ldm_jax.train.workdir`)."""

    def preview(self, state, aux, batch: dict) -> dict[str, np.ndarray]:
        """``{tag: uint8 image grid [H, W, 3]}`` for TensorBoard every ``train.preview_every`` steps."""
        return {}


@dataclasses.dataclass(frozen=True)
class Programs:
    """A task's jitted init and step on a mesh, and the abstract arguments of the step."""

    key: Array
    abstract_state: Any  # ShapeDtypeStructs carrying the state shardings
    abstract_aux: Any  # the same for the aux
    state_shardings: Any
    aux_shardings: Any
    init_fn: Callable  # key -> (state, aux), jitted with out_shardings
    step_fn: Callable  # (state, batch, aux) -> (state, metrics), jitted, donates state


@dataclasses.dataclass
class Setup:
    """A fresh state and aux on ``mesh`` plus the jitted step (which donates the state)."""

    task: Task
    mesh: Mesh
    state: Any
    aux: Any
    state_shardings: Any
    aux_shardings: Any
    step_fn: Callable


# Compiled init and step per (task cache key, mesh): another setup()/train() in the same process (a
# resumed run, a restart after preemption, tests) reuses the traced and compiled programs.
_CACHE_SIZE = 8
_cache: dict = {}  # insertion order = least recently used first


def compiler_options(config, backend: str) -> dict | None:
    """XLA options of the jitted init and step: ``config.train.compiler_options`` when set, else
    the backend's defaults (plus the CPU tuning when the process opted in, :mod:`ldm_jax.runtime`)."""
    options = config.train.compiler_options
    return jit_compiler_options(backend, None if options is None else dict(options))


def _build(task: Task, mesh: Mesh) -> Programs:
    key = jax.random.PRNGKey(int(task.config.train.seed))
    abstract_state, abstract_aux = jax.eval_shape(task.init, key)
    state_sh = task.state_shardings(abstract_state, mesh)
    aux_sh = task.aux_shardings(abstract_aux, mesh)
    opts = compiler_options(task.config, mesh.devices.flat[0].platform)
    init_fn = jax.jit(task.init, out_shardings=(state_sh, aux_sh), compiler_options=opts)
    step_fn = jax.jit(on_mesh(task.step, mesh), donate_argnums=0, in_shardings=(state_sh, sharding.batch_sharding(mesh), aux_sh),
                      out_shardings=(state_sh, sharding.replicated(mesh)), compiler_options=opts)
    return Programs(key, ckpt_lib.abstract_like(abstract_state, state_sh), ckpt_lib.abstract_like(abstract_aux, aux_sh),
                    state_sh, aux_sh, init_fn, step_fn)


def _programs(task: Task, mesh: Mesh) -> Programs:
    key = task.cache_key()
    if key is not None:
        key = (key, mesh)
        try:
            hash(key)
        except TypeError:  # e.g. prebuilt models with unhashable fields: no reuse
            key = None
    hit = _cache.pop(key, None) if key is not None else None
    if hit is None:
        hit = _build(task, mesh)
    if key is not None:
        _cache[key] = hit  # most recently used last
        while len(_cache) > _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
    return hit


def programs(task: Task, mesh: Mesh) -> Programs:
    """The task's jitted init and step on ``mesh`` with their abstract arguments, built (traced lazily)
    without creating any array: what ahead-of-time compiles start from (:mod:`ldm_jax.train.plan`)."""
    task.start()
    return _programs(task, mesh)


def abstract_state(task: Task, mesh: Mesh) -> Any:
    """The task's train state as ``ShapeDtypeStruct`` leaves with their shardings on ``mesh`` (e.g. to
    restore a checkpoint onto another mesh), without creating anything."""
    return programs(task, mesh).abstract_state


def setup(task: Task, mesh: Mesh) -> Setup:
    """The initial state (seed ``config.train.seed``) and aux, sharded on ``mesh``, and the jitted
    step; both programs are compiled once per process for the same task configuration and mesh."""
    task.start()
    p = _programs(task, mesh)
    state, aux = p.init_fn(p.key)
    state = task.prepare_state(state, p.state_shardings)
    aux = task.prepare_aux(aux, p.aux_shardings)
    return Setup(task, mesh, state, aux, p.state_shardings, p.aux_shardings, p.step_fn)


class _Divergence:
    """Counts non-finite steps (a ``skipped`` metric, or a non-finite ``loss``) in the fetched metrics."""

    WINDOW, MIN_STEPS = 100, 20

    def __init__(self, max_consecutive: int, max_fraction: float):
        self.max_consecutive, self.max_fraction = int(max_consecutive), float(max_fraction)
        self.consecutive, self.total, self.seen = 0, 0, 0
        self.recent: collections.deque = collections.deque(maxlen=self.WINDOW)

    def check(self, history: list[dict], last_saved: int | None, saving: bool = False) -> None:
        """Count the steps of ``history`` (the metrics log's, one row per step) not seen before; raise
        :class:`TrainingDiverged` past a limit, warn about skipped steps. ``saving``: before a
        checkpoint, the fraction counts from 5 steps on (a run diverged from its first steps is not saved)."""
        rows, self.seen = history[self.seen:], len(history)
        bad_steps = []
        for r in rows:
            skips = "skipped" in r  # the task skips non-finite updates: its state is still finite
            bad = bool(r["skipped"]) if skips else not math.isfinite(r.get("loss", 0.0))
            self.recent.append(bad)
            self.consecutive = self.consecutive + 1 if bad else 0
            if bad:
                self.total += 1
                bad_steps.append(int(r["step"]))
            if bad and not skips:
                self._stop(f"non-finite loss at step {r['step']} (the parameters are no longer finite)", last_saved)
            if self.max_consecutive and self.consecutive >= self.max_consecutive:
                self._stop(f"{self.consecutive} consecutive non-finite steps (skipped) up to step {r['step']}",
                           last_saved)
            self._check_fraction(r["step"], self.MIN_STEPS, last_saved)
        if saving:
            self._check_fraction(history[-1]["step"] if history else 0, 5, last_saved)
        if bad_steps:
            logging.warning("skipped %d non-finite step(s) (%s); %d in this run so far", len(bad_steps),
                            ", ".join(map(str, bad_steps[:5])) + (", ..." if len(bad_steps) > 5 else ""), self.total)

    def _check_fraction(self, step: int, min_steps: int, last_saved: int | None) -> None:
        n, bad = len(self.recent), sum(self.recent)
        if self.max_fraction and n >= min_steps and bad / n > self.max_fraction:
            self._stop(f"{bad} of the last {n} steps non-finite (skipped) at step {step}", last_saved)

    @staticmethod
    def _stop(what: str, last_saved: int | None):
        kept = f"the last checkpoint (step {last_saved}) is kept" if last_saved is not None else "no checkpoint saved"
        raise TrainingDiverged(f"training diverged: {what}; {kept}. Lower train.lr, check the data, or raise "
                               f"train.max_consecutive_skipped / max_skipped_fraction")


class TrainResult(tuple):
    """What :func:`train` returns: ``(state, history)`` (unpacks as a pair), and ``stopped_by``: the
    signal (``signal.SIGTERM``, ``signal.SIGINT``) that stopped the run after its checkpoint, or None
    when it ran to its last step."""

    def __new__(cls, state, history, stopped_by: int | None = None):
        self = super().__new__(cls, (state, history))
        self.stopped_by = stopped_by
        return self

    @property
    def state(self):
        return self[0]

    @property
    def history(self) -> list[dict]:
        return self[1]


def _check_loop_config(t) -> None:
    """The loop's settings, refused before anything is written into the workdir."""
    for key in ("checkpoint_every", "keep_checkpoints", "log_every"):
        if int(t[key]) < 1:
            raise ValueError(f"config.train.{key} must be >= 1, got {t[key]}")
    for key in ("keep_every", "preview_every", "max_consecutive_skipped"):
        if int(t[key]) < 0:
            raise ValueError(f"config.train.{key} must be >= 0, got {t[key]}")
    if not 0 <= float(t.max_skipped_fraction) <= 1:
        raise ValueError(f"config.train.max_skipped_fraction must be in [0, 1], got {t.max_skipped_fraction}")


def _data_states(meta: dict) -> dict:
    """``{stage index: [every process's data state]}`` from a checkpoint's metadata."""
    data = meta.get("data", {})
    return {"0": data} if isinstance(data, list) else dict(data)


def train(task: Task, workdir: str, *, devices: Sequence[jax.Device] | None = None) -> TrainResult:
    """Train ``task`` through its stages; resumes from ``workdir``'s latest checkpoint (the newest
    that restores).

    Multi-host: set ``config.distributed``; each process feeds its rows of every global batch.
    SIGTERM or SIGINT saves a checkpoint and returns (``stopped_by`` says which); a second SIGINT
    aborts. ``devices``: the mesh's devices (default all).

    Returns: a :class:`TrainResult`: the final state and the metrics history (one dict per step;
    TensorBoard and the progress bar get them every ``config.train.log_every`` steps).

    Raises:
      WorkdirLocked: another trainer holds ``workdir``.
      CheckpointSaveError: a checkpoint could not be written (the earlier ones are kept).
      CheckpointRestoreError: no checkpoint of ``workdir`` restores.
      TrainingDiverged: too many non-finite steps (see ``config.train.max_consecutive_skipped``).
    """
    config = task.config
    t = config.train
    _check_loop_config(t)
    distributed.initialize_from_config(config.distributed)
    if t.compilation_cache_dir:
        enable_compilation_cache(t.compilation_cache_dir)
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    task.start()
    config = task.config  # as resolved by the task's start (e.g. the pretrained networks)
    stages = task.stages()
    for stage in stages:  # every stage's batch splits over the mesh: checked before anything is written
        sharding.local_batch_rows(mesh, stage.batch_size)
    total = sum(s.steps for s in stages)
    ts = setup(task, mesh)
    lock = workdir_lib.WorkdirLock(workdir)
    if jax.process_index() == 0:  # one holder for all the run's processes
        lock.acquire()
    try:
        return _run(task, workdir, t, mesh, stages, total, ts, config)
    finally:
        lock.release()


def _run(task, workdir, t, mesh, stages, total, ts, config) -> TrainResult:
    from tqdm.auto import tqdm

    workdir_lib.write_config(workdir, config)
    task.write_workdir(workdir, ts.aux)
    state = ts.state
    ckpt = workdir_lib.open_checkpoints(workdir, t)
    meta: dict = {}
    if ckpt.latest_step() is not None:
        try:
            state, meta = ckpt.restore(ckpt_lib.abstract_like(state, ts.state_shardings))
        except BaseException:
            ckpt.close()
            raise
        logging.info("%s: resumed from step %d", task.name, int(state.step))
    step = int(state.step)
    data_states = _data_states(meta)

    writer = MetricWriter(workdir_lib.tensorboard_dir(workdir) if t.tensorboard else None)
    bar = tqdm(total=total, initial=step, desc=task.name, dynamic_ncols=True,
               disable=not t.progress or jax.process_index() != 0)
    log_every, preview_every = int(t.log_every), int(t.preview_every)
    current, source = None, None
    metrics_log = MetricsLog(rate_in_history=True)
    divergence = _Divergence(t.max_consecutive_skipped, t.max_skipped_fraction)
    guard = ckpt_lib.PreemptionGuard(check_every=int(t.preemption_check_every))
    failed = True
    try:
        with guard:
            while step < total:
                idx = stage_index(stages, step)
                stage = stages[idx]
                if idx != current:  # new stage (or start): new data shape, compiles once
                    rows = sharding.local_batch_rows(mesh, stage.batch_size)
                    source = task.batches(stage, rows, workdir)
                    saved = data_states.get(str(idx))
                    if saved is not None:
                        source.set_state(saved[jax.process_index()])
                    # the next batches go to the devices while this step runs; the saved position is
                    # the one before the next batch the step consumes (no batch lost or repeated)
                    source = DevicePrefetchIterator(source, sharding.batch_sharding(mesh), int(t.prefetch))
                    current = idx
                    logging.info("%s stage %d: %d px, batch %d, steps %d..%d", task.name, idx, stage.resolution,
                                 stage.batch_size, step, sum(s.steps for s in stages[:idx + 1]))
                batch = next(source)
                state, metrics = ts.step_fn(state, batch, ts.aux)
                step += 1
                metrics_log.add(step, metrics, stage.batch_size)
                bar.update(1)
                if step % log_every == 0 or step == total:
                    m = metrics_log.flush()
                    divergence.check(metrics_log.history, ckpt.latest_step())
                    m["stage"] = idx
                    writer.scalars(step, {k: v for k, v in m.items() if k != "step"})
                    writer.flush()
                    bar.set_postfix(loss=f"{m['loss']:.4g}", img_s=f"{m['images_per_s']:.1f}",
                                    **{k: f"{m[k]:.4g}" for k in task.progress_keys}, stage=idx)
                if preview_every and step % preview_every == 0:
                    for tag, grid in task.preview(state, ts.aux, batch).items():
                        writer.image(step, tag, grid)

                def checkpoint_meta():  # gathers every process's data position: a collective
                    metrics_log.fetch()  # a diverged state is never saved
                    divergence.check(metrics_log.history, ckpt.latest_step(), saving=True)
                    data_states[str(idx)] = ckpt_lib.allgather_json(source.get_state())
                    return {"stage": idx, "step": step, "data": data_states}

                if ckpt.save_or_stop(guard, step, state, checkpoint_meta, last=step == total):
                    break
        failed = False
    finally:
        history = metrics_log.close()
        bar.close()
        writer.close()
        if failed:  # keep the error being raised; a save in flight still completes (or is reported in the log)
            try:
                ckpt.close()
            except Exception as e:  # noqa: BLE001
                logging.warning("while stopping: %s", e)
        else:
            ckpt.close()
    return TrainResult(state, history, guard.signum)
