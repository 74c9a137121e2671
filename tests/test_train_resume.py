"""Diffusion training across processes and restarts: two processes == one process, exact resume
across a stage change (SIGTERM), restore onto another mesh, SIGKILL during a save.

All tests share one run configuration (micro UNet / text encoder / VAE, images through the frozen
VAE, 50% text dropout, FSDP mesh data=2 x fsdp=4, two progressive stages), so the in-process runs
compile the init and the two step shapes once (the training loop caches them) and the SIGKILL
worker loads them from this module's persistent compilation cache. Programs compile with XLA
optimisation level 0 (``train.compiler_options``): several times faster to build on CPU.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from ldm_jax.config_utils import load_config
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import diffusion_task as D
from ldm_jax.train import sharding
from signals import SigtermAt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_CACHE_ENV = "LDM_JAX_TEST_XLA_CACHE"


def _config(**train):
    """tiny_train with the smallest models that keep every block type of the trainer's
    path: UNet with one level (resnets, cross-attention mid block), 1-layer text encoder, 1-level VAE."""
    c = load_config("tiny_train")
    c.train.update(dict(progress=False, tensorboard=False, preview_every=0, log_every=1, compiler_options=FAST_COMPILE,
                        **train))
    c.unet.update(dict(block_out_channels=(16,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                       norm_num_groups=4, cross_attention_dim=16, attention_head_dim=8))
    c.text_encoder.update(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    c.vae.update(dict(block_out_channels=(8,), norm_num_groups=4))
    return c


def _run_config(**train):
    """Images -> frozen VAE -> latents, text dropout 0.5, two stages (4 px then 8 px), FSDP."""
    c = _config(**dict(dict(text_dropout=0.5, checkpoint_every=100, keep_checkpoints=5), **train))
    c.stages = [dict(resolution=4, steps=2, batch_size=8), dict(resolution=8, steps=2, batch_size=8)]
    c.mesh = dict(data=2, fsdp=4)
    return c


def _kill_config():
    return _run_config(checkpoint_every=2)


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    """A persistent compilation cache for this module (a fresh temp dir per session), shared with
    the worker processes; the previous cache settings come back afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = str(tmp_path_factory.mktemp("xla_cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (path, 0.0, -1)):
        jax.config.update(n, v)
    cc.reset_cache()
    yield path
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


def _env(cache, xla_flags=None):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop(_CACHE_ENV, None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if cache:
        env[_CACHE_ENV] = cache
    return env


# Every worker: CPU, same precision as conftest, this module's persistent compilation cache if given.
_PRELUDE = """
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    if os.environ.get("{cache_env}"):
        jax.config.update("jax_compilation_cache_dir", os.environ["{cache_env}"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    sys.path.insert(0, os.path.join({root!r}, "tests"))
    from test_train_resume import _kill_config, _run_config
    from ldm_jax.train import diffusion_task as D, loop
"""


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted reference run (4 steps over the stage change) on one process, 8 devices."""
    state, hist = D.train(_run_config(), str(tmp_path_factory.mktemp("full")))
    assert int(state.step) == 4 and int(state.stage) == 1 and [h["step"] for h in hist] == [1, 2, 3, 4]
    return state, hist


# ----------------------------------------------------------------------------------------------
# Exact resume across a stage change; restore onto another mesh


def test_exact_resume_across_stage_change(full_run, tmp_path):
    full, full_hist = full_run
    c = _run_config(prefetch=1)  # the signals are keyed to reading a batch: no read-ahead
    # (resuming exactly with read-ahead: tests/test_pod_path.py, SIGTERM at every step)
    offsets = [0, 2]  # global step of each stage's first batch

    def source_fn(config, stage, rows):
        idx = [s.resolution for s in D.get_stages(config)].index(stage.resolution)
        return SigtermAt(D.make_batch_source(config, stage, rows), at={0, 2}, first_step=offsets[idx])

    work = str(tmp_path / "split")
    steps_seen, hist = [], []
    for _ in range(3):  # stops after step 1 (stage 0), after step 3 (stage 1), then finishes
        state, h = D.train(c, work, batch_source_fn=source_fn)
        steps_seen.append(int(state.step))
        hist += h
    assert steps_seen == [1, 3, 4]
    assert int(state.stage) == 1
    assert [h["loss"] for h in hist] == [h["loss"] for h in full_hist]
    a, b = _flat((full.params, full.ema_params, full.opt_state)), _flat((state.params, state.ema_params, state.opt_state))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit-identical

    # Restore the final checkpoint onto another mesh shape (data=8) and check the values.
    mesh = sharding.make_mesh(dict(data=8))
    mngr = ckpt_lib.CheckpointManager(os.path.join(work, "checkpoints"), save_every=100)
    assert mngr.all_steps() == [1, 3, 4]
    restored, meta = mngr.restore(D.abstract_train_state(c, mesh))
    mngr.close()
    assert meta["stage"] == 1 and int(restored.step) == 4
    assert jax.tree.leaves(restored.params)[0].sharding.mesh.shape["data"] == 8
    r = _flat(restored.params)
    for k, v in _flat(state.params).items():
        np.testing.assert_array_equal(r[k], v)


# ----------------------------------------------------------------------------------------------
# SIGKILL during a save


_KILL_WORKER = _PRELUDE + """
    import time
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *a, **k):  # the step-4 save hangs after writing, before the rename
        if self.get_final().name == "4":
            print("SAVING", flush=True)
            time.sleep(600)
        return await original(self, *a, **k)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    D.train(_kill_config(), sys.argv[1])
"""


def test_sigkill_during_save_resumes_from_previous_checkpoint(full_run, xla_cache, tmp_path):
    """A worker (same config and 8 devices as this process: its programs come from the persistent
    cache) saves at step 2 and is killed while writing step 4; the resumed run continues from step 2
    (the stage boundary) and ends bit-identical to the uninterrupted run."""
    full, full_hist = full_run
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_KILL_WORKER.format(root=ROOT, cache_env=_CACHE_ENV)))
    work = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(work)], env=_env(xla_cache, os.environ.get("XLA_FLAGS")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 300
    try:
        for line in proc.stdout:
            lines.append(line)
            if "SAVING" in line or time.time() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert any("SAVING" in l for l in lines), "".join(lines)[-3000:]
    assert proc.returncode == -signal.SIGKILL
    names = os.listdir(work / "checkpoints")
    assert any(n.startswith("4") and "tmp" in n for n in names), names  # the half-written save
    mngr = ckpt_lib.CheckpointManager(str(work / "checkpoints"), save_every=2)
    assert mngr.latest_step() == 2
    mngr.close()
    state, hist = D.train(_kill_config(), str(work))
    assert [h["step"] for h in hist] == [3, 4] and int(state.step) == 4
    assert [h["loss"] for h in hist] == [h["loss"] for h in full_hist[2:]]
    a, b = _flat((full.params, full.ema_params, full.opt_state)), _flat((state.params, state.ema_params, state.opt_state))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------------------------
# Two processes (4 devices each, gloo collectives) == one process with 8 devices


_WORKER = _PRELUDE + """
    import dataclasses, json
    import numpy as np
    from jax._src import distributed
    from jax.experimental import multihost_utils
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, workdir = int(sys.argv[1]), sys.argv[2]

    # gloo gives a collective's participants 30 s to meet the first time it runs, and the two
    # processes share 2 cores: compile each step shape ahead, then wait for the other process
    # before the first run (the same executable train() would get from jit).
    setup = loop.setup

    def synced_setup(*args, **kwargs):
        ts = setup(*args, **kwargs)
        compiled = {{}}

        def step_fn(state, batch, frozen):
            shapes = str(jax.tree.map(lambda x: (x.shape, x.dtype), batch))
            if shapes not in compiled:
                compiled[shapes] = ts.step_fn.lower(state, batch, frozen).compile()
                distributed.global_state.client.wait_at_barrier(f"step_compiled_{{len(compiled)}}", 600_000)
            return compiled[shapes](state, batch, frozen)

        return dataclasses.replace(ts, step_fn=step_fn)

    loop.setup = synced_setup
    c = _run_config()
    c.distributed.update(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id=pid)
    state, hist = D.train(c, workdir)
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if pid == 0:
        flat = {{jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}}
        np.savez(os.path.join(workdir, "params.npz"), **flat)
        json.dump(hist, open(os.path.join(workdir, "history.json"), "w"))
    jax.distributed.shutdown()
"""


def test_two_processes_match_single_process(full_run, tmp_path):
    """Runs without the persistent cache: on CPU, a process that loads an executable another process
    of the same job compiled (cache hit or jax_share_binary_between_hosts) can hang, and the two
    workers compile the same programs side by side anyway."""
    full, full_hist = full_run
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_WORKER.format(root=ROOT, cache_env=_CACHE_ENV, port=_free_port())))
    workdir = tmp_path / "run"
    env = _env(None, "--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(workdir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    hist = json.load(open(workdir / "history.json"))
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in full_hist], rtol=0, atol=1e-5)
    # the same text-dropout draws whatever the process layout
    assert [h["text_dropped"] for h in hist] == [h["text_dropped"] for h in full_hist]
    assert 0 < np.mean([h["text_dropped"] for h in hist]) < 1
    ref = _flat(full.params)
    got = dict(np.load(workdir / "params.npz"))
    assert set(got) == set(ref)
    err = max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref)
    assert err <= 1e-5, err
