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
turns SIGTERM into a final checkpoint and a clean stop. A run stopped at step N and resumed is
bit-identical to an uninterrupted one.

Settings come from ``config.train`` (:func:`ldm_jax.configs.common.loop_config`), ``config.mesh``,
``config.sharding`` and ``config.distributed``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from ldm_jax.configs.common import LOOP_KEYS
from ldm_jax.runtime import enable_compilation_cache, jit_compiler_options
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.data.pipeline import DevicePrefetchIterator
from ldm_jax.train import distributed, sharding
from ldm_jax.train import workdir as workdir_lib
from ldm_jax.train.writers import MetricsLog, MetricWriter

__all__ = ["Stage", "Task", "Setup", "stage_index", "setup", "abstract_state", "compiler_options", "train"]

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
class _Programs:
    key: Array
    abstract_state: Any  # ShapeDtypeStructs carrying the state shardings
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


def _build(task: Task, mesh: Mesh) -> _Programs:
    key = jax.random.PRNGKey(int(task.config.train.seed))
    abstract_state, abstract_aux = jax.eval_shape(task.init, key)
    state_sh = task.state_shardings(abstract_state, mesh)
    aux_sh = task.aux_shardings(abstract_aux, mesh)
    opts = compiler_options(task.config, mesh.devices.flat[0].platform)
    init_fn = jax.jit(task.init, out_shardings=(state_sh, aux_sh), compiler_options=opts)
    step_fn = jax.jit(task.step, donate_argnums=0, in_shardings=(state_sh, sharding.batch_sharding(mesh), aux_sh),
                      out_shardings=(state_sh, sharding.replicated(mesh)), compiler_options=opts)
    return _Programs(key, ckpt_lib.abstract_like(abstract_state, state_sh), state_sh, aux_sh, init_fn, step_fn)


def _programs(task: Task, mesh: Mesh) -> _Programs:
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


def abstract_state(task: Task, mesh: Mesh) -> Any:
    """The task's train state as ``ShapeDtypeStruct`` leaves with their shardings on ``mesh`` (e.g. to
    restore a checkpoint onto another mesh), without creating anything."""
    task.start()
    return _programs(task, mesh).abstract_state


def setup(task: Task, mesh: Mesh) -> Setup:
    """The initial state (seed ``config.train.seed``) and aux, sharded on ``mesh``, and the jitted
    step; both programs are compiled once per process for the same task configuration and mesh."""
    task.start()
    p = _programs(task, mesh)
    state, aux = p.init_fn(p.key)
    state = task.prepare_state(state, p.state_shardings)
    aux = task.prepare_aux(aux, p.aux_shardings)
    return Setup(task, mesh, state, aux, p.state_shardings, p.aux_shardings, p.step_fn)


def _data_states(meta: dict) -> dict:
    """``{stage index: [every process's data state]}`` from a checkpoint's metadata."""
    data = meta.get("data", {})
    return {"0": data} if isinstance(data, list) else dict(data)


def train(task: Task, workdir: str, *, devices: Sequence[jax.Device] | None = None) -> tuple[Any, list[dict]]:
    """Train ``task`` through its stages; resumes from ``workdir``'s latest checkpoint.

    Multi-host: set ``config.distributed``; each process feeds its rows of every global batch.
    SIGTERM saves a checkpoint and returns. ``devices``: the mesh's devices (default all).

    Returns: the final state and the metrics history (one dict per step; TensorBoard and the
    progress bar get them every ``config.train.log_every`` steps).
    """
    from tqdm.auto import tqdm

    config = task.config
    t = config.train
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
    workdir_lib.write_config(workdir, config)
    task.write_workdir(workdir, ts.aux)
    state = ts.state
    ckpt = workdir_lib.open_checkpoints(workdir, t)
    meta: dict = {}
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(ckpt_lib.abstract_like(state, ts.state_shardings))
        logging.info("%s: resumed from step %d", task.name, int(state.step))
    step = int(state.step)
    data_states = _data_states(meta)

    writer = MetricWriter(workdir_lib.tensorboard_dir(workdir) if t.tensorboard else None)
    bar = tqdm(total=total, initial=step, desc=task.name, dynamic_ncols=True,
               disable=not t.progress or jax.process_index() != 0)
    log_every, preview_every = int(t.log_every), int(t.preview_every)
    current, source = None, None
    metrics_log = MetricsLog(rate_in_history=True)
    try:
        with ckpt_lib.PreemptionGuard(check_every=int(t.preemption_check_every)) as guard:
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
                    m["stage"] = idx
                    writer.scalars(step, {k: v for k, v in m.items() if k != "step"})
                    writer.flush()
                    bar.set_postfix(loss=f"{m['loss']:.4g}", img_s=f"{m['images_per_s']:.1f}",
                                    **{k: f"{m[k]:.4g}" for k in task.progress_keys}, stage=idx)
                if preview_every and step % preview_every == 0:
                    for tag, grid in task.preview(state, ts.aux, batch).items():
                        writer.image(step, tag, grid)

                def checkpoint_meta():  # gathers every process's data position: a collective
                    data_states[str(idx)] = ckpt_lib.allgather_json(source.get_state())
                    return {"stage": idx, "step": step, "data": data_states}

                if ckpt.save_or_stop(guard, step, state, checkpoint_meta, last=step == total):
                    break
    finally:
        history = metrics_log.close()
        bar.close()
        ckpt.close()
        writer.close()
    return state, history
