"""Faults during training and sampling: nothing already saved is lost, every error is one clear line.

Disk full during an asynchronous save (a small tmpfs), a truncated file in the latest checkpoint
(training and sampling fall back to the one before it, and the resumed run is bit-identical to an
uninterrupted one). The runs use the micro models of ``test_train_resume`` on one device.
"""
import contextlib
import os
import subprocess

import jax
import numpy as np
import pytest
from test_train_resume import _config

from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import diffusion_task as D
from ldm_jax.train.workdir import checkpoint_steps, restore_unet_params


def _cfg(steps, **train):
    c = _config(**dict(dict(checkpoint_every=2, keep_checkpoints=3), **train))
    c.stages = [dict(resolution=8, steps=steps, batch_size=4)]
    return c


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _train(steps, work, **train):
    return D.train(_cfg(steps, **train), str(work), devices=jax.devices()[:1])


@contextlib.contextmanager
def _tmpfs(path, size_mb):
    os.makedirs(path)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"a tmpfs for the disk-full case needs mount (root): {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _tree_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_disk_full_during_training_stops_at_once_and_keeps_every_complete_checkpoint(tmp_path):
    with _tmpfs(tmp_path / "disk", 64) as disk:
        work = disk / "run"
        _train(4, work)
        ckpts = work / "checkpoints"
        assert checkpoint_steps(work) == [2, 4]
        one = _tree_size(ckpts / "4")
        st = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:  # leave a third of one checkpoint free
            f.write(b"\0" * (st.f_bavail * st.f_frsize - one // 3))
        with pytest.raises(ckpt_lib.CheckpointSaveError) as err:
            _train(8, work)  # saves asynchronously at step 6: the disk fills
        msg = str(err.value)
        assert "\n" not in msg and "step 6" in msg and "no space left on device" in msg, msg
        assert str(ckpts) in msg and "[2, 4]" in msg, msg
        # the run's own partial files are gone (the space is free again); the complete checkpoints restore
        assert not [n for n in os.listdir(ckpts) if "tmp" in n], os.listdir(ckpts)
        assert checkpoint_steps(work) == [2, 4]
        params, step = restore_unet_params(work)
        assert step == 4 and params


def _truncate_arrays(step_dir):
    """Truncate every array data file of a checkpoint step (OCDBT ``d/`` files), as a crash of the
    storage under it would."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") for f in fs
             if os.path.basename(d) == "d"]
    assert files
    for victim in files:
        with open(victim, "r+b") as f:
            f.truncate(16)


def test_truncated_latest_checkpoint_falls_back_and_resumes_exactly(tmp_path, caplog):
    full, full_hist = _train(6, tmp_path / "full")
    work = tmp_path / "run"
    _train(6, work)  # stands for a run that died after its step-6 save ...
    _truncate_arrays(work / "checkpoints" / "6")  # ... with the last save damaged
    _truncate_arrays(work / "checkpoints" / "4")

    # sampling from the workdir reads the newest checkpoint that restores, and says which it skipped
    with caplog.at_level("WARNING"):
        params, step = restore_unet_params(work)
    assert step == 2 and "step 6" in caplog.text and "step 4" in caplog.text
    ref, _ = restore_unet_params(tmp_path / "full", 2)
    for k, v in _flat(ref).items():
        np.testing.assert_array_equal(_flat(params)[k], v)

    # training falls back to step 2, moves 6 and 4 aside, and reaches the uninterrupted run's state
    caplog.clear()
    with caplog.at_level("WARNING"):
        state, hist = _train(6, work)
    assert "does not restore" in caplog.text
    names = sorted(os.listdir(work / "checkpoints"))
    assert "4.unrestorable-0" in names and "6.unrestorable-0" in names, names
    assert checkpoint_steps(work) == [2, 4, 6]
    assert [h["loss"] for h in hist] == [h["loss"] for h in full_hist[2:]]
    a, b = _flat((full.params, full.ema_params, full.opt_state)), _flat((state.params, state.ema_params, state.opt_state))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit-identical

    # nothing restores: one clear error naming every step and why
    for s in (2, 4, 6):
        _truncate_arrays(work / "checkpoints" / str(s))
    with pytest.raises(ckpt_lib.CheckpointRestoreError) as err:
        _train(6, work)
    assert "\n" not in str(err.value) and all(f"step {s}" in str(err.value) for s in (2, 4, 6))


# ----------------------------------------------------------------------------------------------
# Divergence, one writer per workdir, signals and exit codes


def test_a_run_whose_steps_are_all_non_finite_stops_with_an_error_and_saves_nothing(tmp_path, caplog):
    from ldm_jax.cli import _exit_code
    from ldm_jax.train.loop import TrainingDiverged

    work = tmp_path / "run"
    with caplog.at_level("WARNING"), pytest.raises(TrainingDiverged) as err:
        _train(40, work, lr=1e30, checkpoint_every=10)
    msg = str(err.value)
    assert "\n" not in msg and "diverged" in msg and "no checkpoint saved" in msg, msg
    assert checkpoint_steps(work) == []  # the diverged state was never saved
    assert "skipped" in caplog.text  # the console said so as it happened
    assert _exit_code(err.value) == 1
    # with the checks off the same run finishes (the loop's skipping keeps the state finite)
    state, _ = _train(40, tmp_path / "off", lr=1e30, max_consecutive_skipped=0, max_skipped_fraction=0.0)
    assert int(state.skipped_steps) > 30


def test_a_second_trainer_on_a_workdir_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    import json
    import sys

    from ldm_jax.train.workdir import LOCK_FILE, WorkdirLock, WorkdirLocked

    work = tmp_path / "run"
    with WorkdirLock(str(work)) as held:  # a trainer that is running
        with pytest.raises(WorkdirLocked) as err:
            _train(2, work)
        assert "\n" not in str(err.value) and f"pid {held.info['pid']}" in str(err.value)
        assert not (work / "checkpoints").exists()  # the refused trainer wrote nothing
    assert not (work / LOCK_FILE).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (work / LOCK_FILE).write_text(json.dumps({"host": held.info["host"], "pid": dead.pid, "started": 0}))
    with caplog.at_level("WARNING"):
        _train(2, work)
    assert "stale lock" in caplog.text and checkpoint_steps(work) == [2]
    assert not (work / LOCK_FILE).exists()  # released at the end of the run


_MICRO_CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from test_faults import _cfg

def get_config():
    return _cfg(100000, checkpoint_every=1)
"""


def test_sigint_and_sigterm_save_and_exit_with_their_codes(tmp_path):
    import signal
    import sys
    import time

    tests = os.path.dirname(os.path.abspath(__file__))
    cfg = tmp_path / "micro.py"
    cfg.write_text(_MICRO_CONFIG.format(tests=tests))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(tests))
    env.pop("XLA_FLAGS", None)
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        work = tmp_path / sig.name
        # SIGINT as in a terminal: a suite run in the background hands its children an ignored SIGINT
        procs[sig] = (work, subprocess.Popen([sys.executable, "-m", "ldm_jax.cli", "train", "--config", str(cfg),
                                              "--workdir", str(work)], env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True,
                                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
    for sig, (work, proc) in procs.items():
        deadline = time.time() + 240
        while not (work.exists() and checkpoint_steps(work)) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)  # a first checkpoint: the loop runs
        proc.send_signal(sig)
    for sig, (work, proc) in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 128 + sig, (sig, proc.returncode, err[-3000:])
        assert "rerun the same command to resume" in err
        import re

        step = int(re.search(r"stopped by signal \d+ after saving a checkpoint at step (\d+)", err).group(1))
        assert checkpoint_steps(work)[-1] == step  # the step it stopped at, saved


# ----------------------------------------------------------------------------------------------
# Sampling: bad input through the CLI (exit 2, one line naming the value), non-finite outputs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from ldm_jax.reference import write_reference_folder

    return write_reference_folder(str(tmp_path_factory.mktemp("model") / "m"), "v1")


@pytest.fixture(scope="module")
def images(tmp_path_factory, model_dir):
    from PIL import Image

    from ldm_jax.pipeline import StableDiffusionPipeline

    d = tmp_path_factory.mktemp("images")
    size = StableDiffusionPipeline.from_pretrained(model_dir).config.unet["sample_size"] * 8
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(d / "init.png")
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 2] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:8, :8]).save(d / "small_mask.png")
    (d / "truncated.png").write_bytes((d / "init.png").read_bytes()[:100])
    return d


def test_bad_cli_input_is_one_line_and_exit_2(tmp_path, model_dir, images, capsys):
    from ldm_jax.cli import cli

    s = ["sample", "--model", model_dir, "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "o")]
    init, mask = str(images / "init.png"), str(images / "mask.png")
    work = tmp_path / "w"
    cases = [
        (s + ["--num-images", "0"], "--num-images must be >= 1"),
        (s + ["--height", "100000", "--width", "100000"], "GiB"),
        (s + ["--height", "12"], "height=12"),
        (s + ["--sampler", "nope"], "nope"),
        (s + ["--steps", "0"], "num_inference_steps"),
        (s + ["--guidance", "nan"], "guidance_scale"),
        (s + ["--init-image", init, "--strength", "1.5"], "--strength must be in (0, 1]"),
        (s + ["--init-image", init, "--mask", mask, "--strength", "0"], "--strength must be in (0, 1]"),
        (s + ["--strength", "0.5"], "--strength needs --init-image"),
        (s + ["--mask", mask], "--mask needs --init-image"),
        (s + ["--init-image", str(images / "truncated.png")], "truncated.png"),
        (s + ["--init-image", str(images / "missing.png")], "missing.png"),
        (s + ["--init-image", init, "--mask", str(images / "small_mask.png")], "mask is 8x8"),
        (s[:2] + [str(tmp_path / "no-model")] + s[3:], "no-model"),
        (["train", "--config", "tiny_train", "--workdir", str(work), "--config.train.checkpoint_every=0"],
         "checkpoint_every"),
        (["train", "--config", "tiny_train", "--workdir", str(work), "--config.train.nope=1"], "nope"),
        (["train", "--config", "no_such_recipe", "--workdir", str(work)], "no_such_recipe"),
        (["train", "--config", "sd_v1_train", "--workdir", str(work)], "config.init.pretrained"),
    ]
    for argv, needle in cases:
        code = cli(argv)
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if "error" in ln.lower()]  # beside a progress bar, if one started
        assert code == 2, (argv, code, err)
        assert "Traceback" not in err and len(errors) == 1, (argv, err)
        assert errors[0].startswith("ldm-jax: error: ") and needle in errors[0], (argv, err)
    assert not work.exists()  # refused before anything was written
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_pipeline_refuses_bad_values_and_non_finite_results(model_dir, images):
    from PIL import Image

    from ldm_jax.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    kw = dict(num_inference_steps=2, output_type="np")
    for prompt, needle in ((None, "got NoneType"), (5, "got int"), (["a", b"b"], "got bytes"),
                           ("a \ud800 b", "not valid UTF-8")):
        with pytest.raises(ValueError, match=needle):
            pipe(prompt, **kw)
    with pytest.raises(ValueError, match="height must be an integer"):
        pipe("a", height=16.0, **kw)
    with pytest.raises(ValueError, match="guidance_rescale"):
        pipe("a", guidance_rescale=float("nan"), **kw)
    size = pipe.config.unet["sample_size"]
    with pytest.raises(ValueError, match="latents hold NaN"):
        pipe("a", latents=np.full((1, size, size, 4), np.nan, np.float32), **kw)
    init = np.asarray(Image.open(images / "init.png"), np.float32)  # 0-255 floats: not taken as [0, 1]
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        pipe.img2img("a", init, 0.5, **kw)
    # NaN in a weight: an error naming the cause, not a black image
    bad = jax.tree.map(lambda x: x, pipe.params)
    leaf = bad["unet"]["conv_in"]["kernel"]
    bad["unet"]["conv_in"]["kernel"] = np.where(np.arange(leaf.size).reshape(leaf.shape) == 0, np.nan, leaf)
    nan_pipe = StableDiffusionPipeline(pipe.config, bad, pipe.tokenizer)
    with pytest.raises(FloatingPointError, match="weights"):
        nan_pipe("a", **kw)


def test_strength_is_honoured_with_a_mask_and_images_are_written_whole(tmp_path, model_dir, images):
    from PIL import Image

    from ldm_jax.pipeline import StableDiffusionPipeline, sample_to_dir

    init, mask = Image.open(images / "init.png").convert("RGB"), Image.open(images / "mask.png").convert("L")
    common = dict(num_inference_steps=4, guidance_scale=1.0, seed=0, output_type="np")
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    half = pipe.inpaint("a cat", init, mask, strength=0.5, **common)
    full = pipe.inpaint("a cat", init, mask, strength=1.0, **common)
    assert np.abs(half - full).max() > 0.05  # strength changes an inpainting
    out = sample_to_dir(model_dir, "a cat", str(tmp_path / "o"), num_inference_steps=4, guidance_scale=1.0,
                        init_image=str(images / "init.png"), mask=str(images / "mask.png"), strength=0.5)
    got = np.asarray(Image.open(out[0]), np.float32) / 255
    np.testing.assert_allclose(got, half[0], atol=1 / 255 + 1e-6)
    assert sorted(os.listdir(tmp_path / "o")) == ["000_00.png", "grid.png"]  # no temporary files left


def test_a_damaged_checkpoint_in_a_bucket_falls_back_and_is_moved_aside(gcs, caplog):
    """The pod path: the workdir is a bucket (the tests' GCS server); a resumed run steps over a damaged
    latest checkpoint there as it does on a local disk."""
    from ldm_jax import storage

    work = f"{gcs}/faults-run"
    full, _ = _train(4, work)

    def objects(prefix):
        for name in storage.listdir(prefix):
            p = f"{prefix}/{name}"
            yield from objects(p) if storage.isdir(p) else [p]

    for victim in [p for p in objects(f"{work}/checkpoints/4/state") if "/d/" in p]:
        storage.write_bytes(victim, storage.read_bytes(victim)[:16])
    with caplog.at_level("WARNING"):
        state, _ = _train(4, work)  # restores step 2, trains 3 and 4 again
    assert "does not restore" in caplog.text
    assert "4.unrestorable-0" in storage.listdir(f"{work}/checkpoints") and checkpoint_steps(work) == [2, 4]
    a, b = _flat((full.params, full.opt_state)), _flat((state.params, state.opt_state))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
