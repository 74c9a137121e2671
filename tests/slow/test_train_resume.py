"""Slow diffusion-training tests, run by `make test-slow` (outside `make test` for now: each
`train()` call recompiles the step, 1-2 min each on 2 cores): two processes == one, exact resume
across a stage change (SIGTERM), SIGKILL mid-save."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.config_utils import load_config
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import diffusion as D
from ldm_jax.train import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**train):
    c = load_config(os.path.join(ROOT, "configs/tiny_train.py"))
    c.train.update(dict(progress=False, tensorboard=False, sample_every=0, log_every=1, **train))
    return c


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------------------------
# Sharded (data=2, fsdp=4) == one device; two processes == one process


def _sharded_config():
    c = _config()
    c.stages = [dict(resolution=16, steps=3, batch_size=8)]  # images through the frozen VAE
    c.train.text_dropout = 0.5
    return c


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    runs = {}
    for name, mesh, devices in (("sharded", dict(data=2, fsdp=4), None),
                                ("single", dict(data=1), jax.devices()[:1])):
        c = _sharded_config()
        c.mesh = dict(mesh)
        state, hist = D.train(c, str(tmp_path_factory.mktemp(name)), devices=devices)
        runs[name] = (state, [h["loss"] for h in hist])
    return runs


def test_two_processes_match_single_process(sharded_runs, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(root=ROOT, port=_free_port()))
    workdir = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(workdir)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    losses = json.load(open(workdir / "losses.json"))
    s8, l8 = sharded_runs["sharded"]
    np.testing.assert_allclose(losses, l8, rtol=0, atol=1e-5)
    ref = _flat(s8.params)
    got = dict(np.load(workdir / "params.npz"))
    assert set(got) == set(ref)
    err = max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref)
    assert err <= 1e-5, err


# ----------------------------------------------------------------------------------------------
# Exact resume across a stage change; restore onto another mesh


def _resume_config():
    c = _config(checkpoint_every=100, keep_checkpoints=5)
    c.data.source = "synthetic_latents"
    c.stages = [dict(resolution=4, steps=2, batch_size=8), dict(resolution=8, steps=2, batch_size=8)]
    c.mesh = dict(data=2, fsdp=4)
    return c


class _SigtermAt:
    """Batch source wrapper that sends this process SIGTERM when it yields batch ``at`` (global step)."""

    def __init__(self, inner, first_step, at):
        self.inner, self.step, self.at = inner, first_step, at

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
        self.step += int(s["position"])


def test_exact_resume_across_stage_change(tmp_path):
    c = _resume_config()
    full, full_hist = D.train(c, str(tmp_path / "full"))
    assert int(full.step) == 4 and int(full.stage) == 1

    offsets = [0, 2]  # global step of each stage's first batch

    def source_fn(config, stage, rows):
        idx = [s.resolution for s in D.get_stages(config)].index(stage.resolution)
        return _SigtermAt(D.make_batch_source(config, stage, rows), offsets[idx], at={0, 2})

    work = str(tmp_path / "split")
    steps_seen = []
    for _ in range(3):  # stops after step 1 (stage 0), after step 3 (stage 1), then finishes
        state, hist = D.train(c, work, batch_source_fn=source_fn)
        steps_seen.append(int(state.step))
    assert steps_seen == [1, 3, 4]
    assert int(state.stage) == 1
    a, b = _flat((full.params, full.ema_params, full.opt_state)), _flat((state.params, state.ema_params, state.opt_state))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit-identical

    # Restore the final checkpoint onto another mesh shape (data=8) and check the values.
    mesh = sharding.make_mesh(dict(data=8))
    setup = D.setup(c, mesh)
    mngr = ckpt_lib.CheckpointManager(os.path.join(work, "checkpoints"), save_every=100)
    restored, meta = mngr.restore(ckpt_lib.abstract_like(setup.state, setup.state_shardings))
    mngr.close()
    assert meta["stage"] == 1 and int(restored.step) == 4
    assert jax.tree.leaves(restored.params)[0].sharding.mesh.shape["data"] == 8
    r = _flat(restored.params)
    for k, v in _flat(state.params).items():
        np.testing.assert_array_equal(r[k], v)


# ----------------------------------------------------------------------------------------------
# SIGKILL during a save


_KILL_WORKER = textwrap.dedent("""
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, {root!r}); sys.path.insert(0, os.path.join({root!r}, "tests"))
    from orbax.checkpoint._src.path import atomicity
    from test_train_diffusion import _kill_config
    from ldm_jax.train import diffusion as D

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *a, **k):  # the step-4 save hangs after writing, before the rename
        if self.get_final().name == "4":
            print("SAVING", flush=True)
            time.sleep(600)
        return await original(self, *a, **k)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    D.train(_kill_config(), sys.argv[1])
""")


def _kill_config():
    c = _config(checkpoint_every=2)
    c.data.source = "synthetic_latents"
    c.stages = [dict(resolution=8, steps=4, batch_size=8)]
    c.mesh = dict(data=2, fsdp=4)
    return c


def test_sigkill_during_save_resumes_from_previous_checkpoint(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_KILL_WORKER.format(root=ROOT))
    work = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(work)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 400
    for line in proc.stdout:
        lines.append(line)
        if "SAVING" in line or time.time() > deadline:
            break
    assert any("SAVING" in l for l in lines), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    names = os.listdir(work / "checkpoints")
    assert any(n.startswith("4") and "tmp" in n for n in names), names  # the half-written save
    mngr = ckpt_lib.CheckpointManager(str(work / "checkpoints"), save_every=2)
    assert mngr.latest_step() == 2
    mngr.close()
    state, hist = D.train(_kill_config(), str(work))
    assert [h["step"] for h in hist] == [3, 4] and int(state.step) == 4


# ----------------------------------------------------------------------------------------------
# Text dropout

