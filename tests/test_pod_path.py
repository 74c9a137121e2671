"""Training the way a pod user does: from released weights (``config.init``), with the workdir, the
cached latents and the TensorBoard logs in a bucket (a real GCS API server on loopback, see the
``gcs`` fixture), real data through progressive stages, and two processes stopped by SIGTERM and
resumed from the bucket.

Tiny networks throughout: the pretrained source is a random diffusers folder of
``ldm_jax.reference`` (SD v1 layout), and programs compile with XLA optimisation level 0.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ldm_jax import storage
from ldm_jax.cli import main
from ldm_jax.config_utils import load_config
from ldm_jax.convert import WeightsError, load_model, load_state_dict
from ldm_jax.train import diffusion_task as D
from ldm_jax.train import sharding
from ldm_jax.train.workdir import checkpoint_steps, restore_unet_params
from signals import SigtermAt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = "--config.train.compiler_options={'xla_backend_optimization_level': 0}"
# a one-level UNet (its mid block still attends to the text): compiles in half the time of tiny_train's
SMALL_UNET = ["--config.unet.block_out_channels=(16,)", "--config.unet.down_block_types=('DownBlock2D',)",
              "--config.unet.up_block_types=('UpBlock2D',)", "--config.unet.norm_num_groups=4",
              "--config.unet.attention_head_dim=8"]
QUIET = ["--config.train.progress=False", "--config.train.tensorboard=False", "--config.train.preview_every=0",
         "--config.train.log_every=1", FAST]


def _stages(*stages):
    return "--config.stages=" + repr([dict(resolution=r, steps=s, batch_size=b) for r, s, b in stages])


def _flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(tree)), sep="/")


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny SD-v1-shaped diffusers folder (tokenizer, CLIP text encoder, VAE, UNet, scheduler)."""
    from ldm_jax.reference import write_reference_folder

    return write_reference_folder(str(tmp_path_factory.mktemp("sd") / "tiny-sd"), "v1")


def _pretrained(folder, *more):
    return [f"--config.init.pretrained={folder}", "--config.init.random_encoders=False", *more]


# ---------------------------------------------------------------------------------------- init.pretrained


@pytest.fixture(scope="module")
def bucket_run(folder, gcs):
    """``ldm-jax train --config tiny_train --config.init.pretrained=FOLDER`` with its workdir in the
    bucket: 2 steps, a checkpoint and a TensorBoard preview at step 2. Returns (workdir, overrides)."""
    run = f"{gcs}/single"
    overrides = _pretrained(folder, FAST, "--config.train.progress=False", "--config.train.log_every=1",
                            "--config.train.preview_every=2", "--config.train.checkpoint_every=2",
                            _stages((16, 2, 8)))
    assert main(["train", "--config", "tiny_train", "--workdir", run, *overrides]) == 0
    return run


def test_train_from_a_pretrained_folder_keeps_its_encoders(folder, bucket_run):
    """``ldm-jax train --config tiny_train --config.init.pretrained=DIR`` trains, and the workdir's
    frozen encoders are the folder's, bit for bit (so is its tokenizer, and its config's networks)."""
    run = bucket_run
    src = load_model(folder)
    for name, key in (("text_encoder.safetensors", "text_encoder"), ("vae.safetensors", "vae")):
        saved = traverse_util.unflatten_dict(load_state_dict(f"{run}/frozen/{name}"), sep="/")
        _assert_same(saved, src.params[key])
    cfg = storage.read_json(f"{run}/config.json")
    assert cfg["text_encoder"]["hidden_size"] == src.config.text_encoder.hidden_size
    assert cfg["vae"]["block_out_channels"] == list(src.config.vae.block_out_channels)
    assert storage.listdir(f"{run}/tokenizer") == sorted(os.listdir(os.path.join(folder, "tokenizer")))
    again = load_model(run)  # the workdir is a model source with those encoders
    _assert_same(again.params["text_encoder"], src.params["text_encoder"])


def test_dropped_rows_get_the_folders_empty_prompt_embedding(folder):
    """With every row dropped, the conditioning is the folder's text encoder on "" (transformers' PyTorch
    model and tokenizer as the reference), for token ids and for cached contexts alike."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    c = load_config("tiny_train", _pretrained(folder, "--config.train.text_dropout=1.0"))
    task = D.DiffusionTask(c)
    task.start()
    tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    ref = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval()
    with torch.no_grad():
        want = ref(tok("", padding="max_length", max_length=77, return_tensors="pt").input_ids).last_hidden_state[0]
    np.testing.assert_array_equal(D.empty_prompt_ids(task.config), tok("", padding="max_length", max_length=77).input_ids)
    frozen = dict(task.frozen, empty_ids=jnp.asarray(D.empty_prompt_ids(task.config)))
    inputs = jax.jit(D.make_training_inputs(task.config, task.models))
    rng = np.random.default_rng(0)
    uncached = {"image": rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32),
                "input_ids": rng.integers(0, 900, (3, 77)).astype(np.int32)}
    cached = {"moments": rng.normal(size=(3, 8, 8, 8)).astype(np.float32),
              "context": rng.normal(size=(3, 77, 32)).astype(np.float32)}
    for batch in (uncached, cached):
        context = np.asarray(inputs(batch, frozen, jax.random.PRNGKey(1))[2])
        for row in context:
            np.testing.assert_allclose(row, want.numpy(), rtol=0, atol=1e-4)


def test_pretrained_unet_first_step_loss_equals_diffusers(folder):
    """``init.unet=pretrained`` starts from the folder's UNet (and EMA), and the first step's loss is the
    loss of diffusers' PyTorch UNet of that folder on the same noised latents, timesteps, context and
    targets (1e-4)."""
    import torch
    from diffusers import UNet2DConditionModel

    c = load_config("tiny_train", _pretrained(folder, "--config.init.unet=pretrained", FAST,
                                              _stages((16, 1, 4)), "--config.train.min_snr_gamma=0.1"))
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    ts = D.setup(c, mesh)
    src = load_model(folder)
    _assert_same(jax.device_get(ts.state.params), src.params["unet"])
    _assert_same(jax.device_get(ts.state.ema_params), src.params["unet"])
    cfg = ts.task.config
    batch = sharding.make_global_batch(mesh, next(D.make_batch_source(cfg, D.get_stages(cfg)[0], (0, 4))), 4)
    key = jax.random.fold_in(ts.state.rng, ts.state.step)
    x_t, t, ctx, target, weights, _ = jax.device_get(
        jax.jit(D.make_training_inputs(cfg, ts.task.models))(batch, ts.aux, key))
    _, metrics = ts.step_fn(ts.state, batch, ts.aux)
    ref = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
    with torch.no_grad():
        pred = ref(torch.from_numpy(np.asarray(x_t).transpose(0, 3, 1, 2).copy()), torch.from_numpy(np.array(t)),
                   torch.from_numpy(np.array(ctx))).sample.numpy().transpose(0, 2, 3, 1)
    want = float(np.mean(weights * np.mean((pred - target) ** 2, axis=(1, 2, 3))))
    assert float(np.min(weights)) < 1.0  # min-SNR weights really apply
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-4, atol=1e-6)


def test_full_size_config_without_a_source_fails_before_anything_is_written(tmp_path):
    """sd_v1_train without ``init.pretrained`` would train against random encoders: a one-line error
    naming the key, before any compile, and the workdir is not created."""
    work = tmp_path / "run"
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"config\.init\.pretrained") as err:
        main(["train", "--config", "sd_v1_train", "--workdir", str(work)])
    assert "\n" not in str(err.value) and "random_encoders" in str(err.value)
    assert time.perf_counter() - t0 < 60 and not work.exists()
    with pytest.raises(ValueError, match="init.unet"):
        D.DiffusionTask(load_config("tiny_train", ["--config.init.unet=pretrained"])).start()


def test_a_unet_that_does_not_fit_the_encoders_is_refused(folder, tmp_path):
    """SD v2-shaped weights (48-wide text) with the tiny_train UNet (32-wide cross-attention): an error
    naming both keys, before any compile; with ``init.unet=pretrained`` the source's UNet fits."""
    from ldm_jax.reference import write_reference_folder

    v2 = write_reference_folder(str(tmp_path / "v2"), "v2")
    with pytest.raises(ValueError, match=r"cross_attention_dim \(32\).*hidden_size \(48\)"):
        D.DiffusionTask(load_config("tiny_train", _pretrained(v2))).start()
    task = D.DiffusionTask(load_config("tiny_train", _pretrained(v2, "--config.init.unet=pretrained")))
    task.start()
    assert task.config.unet.cross_attention_dim == 48 and task.config.scheduler.get("prediction_type") == "epsilon"
    c = load_config("tiny_train", _pretrained(folder))
    c.unet.in_channels = 3
    with pytest.raises(ValueError, match="latent_channels"):
        D.DiffusionTask(c).start()


def test_a_wrong_shaped_pretrained_folder_is_a_clear_error(folder, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg_path = bad / "unet" / "config.json"
    cfg = json.load(open(cfg_path))
    cfg["block_out_channels"] = [16, 32]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(WeightsError) as err:
        D.DiffusionTask(load_config("tiny_train", _pretrained(str(bad), "--config.init.unet=pretrained"))).start()
    assert "\n" not in str(err.value) and "unet" in str(err.value)


def test_autoencoder_starts_from_a_released_vae(folder, tmp_path):
    """``ldm-jax train --config tiny_autoencoder --config.init.pretrained=DIR``: the first stage starts
    from the folder's VAE (its architecture and weights)."""
    from ldm_jax.train import autoencoder_task as A

    c = load_config("tiny_autoencoder", [f"--config.init.pretrained={folder}", FAST, "--config.loss.perceptual_weight=0.0",
                                         f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.num_train=16",
                                         "--config.data.num_validation=4", "--config.data.num_heldout=4"])
    ts = A.setup(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    _assert_same(jax.device_get(ts.state.params["ae"]), load_model(folder).params["vae"])


# ---------------------------------------------------------------------------------------- progressive stages


def _image_folder(path, n=24, size=40):
    """Captioned images of coloured squares (a caption file per image)."""
    from PIL import Image

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        img[y:y + size // 3, x:x + size // 3] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(path / f"{i:03d}.png")
        (path / f"{i:03d}.txt").write_text(f"a square number {i % 5}")
    return str(path)


def _tar_shards_in_bucket(images, prefix, shards=2):
    """The image folder as webdataset ``.tar`` shards uploaded under ``prefix``: the glob that reads them."""
    import io
    import tarfile

    names = sorted(n[:-4] for n in os.listdir(images) if n.endswith(".png"))
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name in names[s::shards]:
                for ext in ("png", "txt"):
                    data = open(os.path.join(images, f"{name}.{ext}"), "rb").read()
                    info = tarfile.TarInfo(f"{name}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        storage.write_bytes(f"{prefix}/{s:05d}.tar", buf.getvalue())
    return f"{prefix}/*.tar"


def test_tar_shards_in_the_bucket_read_as_the_local_ones(gcs, tmp_path):
    """Webdataset shards in the bucket (a glob, ranged reads per member) give the same examples as the
    same files on disk."""
    from ldm_jax.data.sources import TarShardSource, source_from_spec

    images = _image_folder(tmp_path / "images", n=6, size=8)
    remote = _tar_shards_in_bucket(images, f"{gcs}/tar-read")
    local = tmp_path / "local"
    local.mkdir()
    for name in storage.listdir(f"{gcs}/tar-read"):
        (local / name).write_bytes(storage.read_bytes(f"{gcs}/tar-read/{name}"))
    a, b = source_from_spec(f"tar:{remote}"), TarShardSource(str(local / "*.tar"))
    assert len(a) == len(b) == 6 and [s.rsplit("/", 1)[1] for s in a.shards] == ["00000.tar", "00001.tar"]
    for i in range(6):
        assert a[i] == b[i]
    with pytest.raises(ValueError, match="does not exist"):
        TarShardSource(f"{gcs}/tar-read/nothing-*.tar")


def test_progressive_stages_from_an_image_folder_resume_exactly(folder, tmp_path):
    """32 px then 64 px from a folder of captioned images (tokenized with the pretrained tokenizer,
    encoded online by the frozen VAE), stopped by SIGTERM within each stage and at the stage change and
    resumed (batches read ahead onto the devices): the same losses and bit-identical weights as the
    uninterrupted run."""
    images = _image_folder(tmp_path / "images")
    c = load_config("tiny_train", _pretrained(folder, *QUIET, *SMALL_UNET, _stages((32, 3, 4), (64, 3, 4)),
                                              "--config.data.source=folder", f"--config.data.path={images}",
                                              "--config.train.checkpoint_every=100", "--config.data.random_flip=True"))
    c.mesh = dict(data=2, fsdp=2)
    devices = jax.devices()[:4]
    full, full_hist = D.train(c, str(tmp_path / "full"), devices=devices)
    assert int(full.step) == 6 and int(full.stage) == 1

    def stop_after(fetches):  # SIGTERM at the run's `fetches`-th batch read (the loop reads 2 ahead)
        return lambda config, stage, rows: SigtermAt(D.make_batch_source(config, stage, rows), at=fetches,
                                                     global_steps=False)

    work, hist, steps = str(tmp_path / "split"), [], []
    for fetches in (0, 2, 0, None):  # stop mid-stage 0, at the stage boundary, in stage 1; then finish
        state, h = D.train(c, work, batch_source_fn=None if fetches is None else stop_after(fetches), devices=devices)
        hist += h
        steps.append(int(state.step))
    assert steps == [1, 3, 4, 6]  # resumed within stage 0, at the change to 64 px, within stage 1
    assert [h["loss"] for h in hist] == [h["loss"] for h in full_hist]
    _assert_same(jax.device_get(state.params), jax.device_get(full.params))
    _assert_same(jax.device_get(state.ema_params), jax.device_get(full.ema_params))


def test_cached_latents_name_one_folder_per_stage_and_are_checked_at_start(folder, tmp_path):
    """``data.cached_latents`` with one folder per stage (comma-separated); a stage whose folder is
    missing or was encoded at another resolution fails when the run starts, naming the stage."""
    images = _image_folder(tmp_path / "images", n=8)
    caches = []
    for size in (16, 32):
        out = str(tmp_path / f"lat{size}")
        main(["encode-dataset", "--model", folder, "--source", images, "--out", out, "--image-size", str(size),
              "--batch-size", "4"])
        caches.append(out)
    stages = _stages((16, 1, 4), (32, 1, 4))
    ok = load_config("tiny_train", _pretrained(folder, stages, f"--config.data.cached_latents={','.join(caches)}"))
    D.check_cached_latents(ok)
    st = D.get_stages(ok)
    assert [D.stage_cached_latents(ok, s) for s in st] == caches
    swapped = load_config("tiny_train", _pretrained(folder, stages, f"--config.data.cached_latents={caches[1]},{caches[0]}"))
    with pytest.raises(ValueError, match="stage 0 trains at 16 px"):
        D.DiffusionTask(swapped).start()
    missing = load_config("tiny_train", _pretrained(folder, stages,
                                                    f"--config.data.cached_latents={caches[0]},{tmp_path / 'nope'}"))
    with pytest.raises(ValueError, match="stage 1 .32 px.*no metadata"):
        D.DiffusionTask(missing).start()
    one = load_config("tiny_train", _pretrained(folder, stages, f"--config.data.cached_latents={caches[0]}"))
    with pytest.raises(ValueError, match="stage 1 trains at 32 px"):
        D.check_cached_latents(one)


# ---------------------------------------------------------------------------------------- a bucket


def test_a_run_in_the_bucket_is_a_model_source(bucket_run):
    """One process, workdir in the bucket: checkpoints (orbax/tensorstore), config.json, frozen/, the
    tokenizer and TensorBoard events land there (resuming from the bucket and sampling from it: the
    two-process test below)."""
    run = bucket_run
    names = storage.listdir(run)
    assert {"config.json", "checkpoints", "frozen", "tokenizer", "tensorboard"} <= set(names), names
    events = storage.listdir(f"{run}/tensorboard")
    assert events and storage.read_bytes(f"{run}/tensorboard/{events[0]}")  # scalars and the preview grid
    assert checkpoint_steps(run) == [2]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_sh(run, overrides, log_dir):
    env = dict(os.environ, PYTHON=sys.executable, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = ["bash", os.path.join(ROOT, "launch", "local.sh"), "--nproc", "2", f"--port={_free_port()}",
           "--log-dir", str(log_dir), "--config", "tiny_train", "--workdir", run, *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)


def test_two_processes_in_the_bucket_stopped_by_sigterm_resume_exactly(folder, gcs, tmp_path):
    """``launch/local.sh --nproc 2`` from a pretrained folder with the workdir *and* the cached latents
    (encoded from webdataset shards in the bucket) in the bucket: stopped with SIGTERM, resumed from the
    bucket, it ends bit-identical to an uninterrupted run; then ``ldm-jax sample --model gs://...``
    writes images."""
    shards = _tar_shards_in_bucket(_image_folder(tmp_path / "images", n=16), f"{gcs}/shards")
    latents = f"{gcs}/latents16"
    main(["encode-dataset", "--model", folder, "--source", f"tar:{shards}", "--out", latents, "--image-size", "16",
          "--batch-size", "8"])
    steps = 10
    overrides = _pretrained(folder, FAST, *SMALL_UNET, "--config.train.log_every=5", "--config.train.preview_every=0",
                            "--config.train.tensorboard=False",
                            "--config.train.checkpoint_every=1000", "--config.train.preemption_check_every=1",
                            f"--config.data.cached_latents={latents}", _stages((16, steps, 8)))
    full = _local_sh(f"{gcs}/full", overrides, tmp_path / "logs_full")
    out = full.communicate(timeout=600)[0].decode(errors="replace")
    assert full.returncode == 0, out[-3000:]

    split = _local_sh(f"{gcs}/split", overrides, tmp_path / "logs_split")
    seen, stopped = b"", False
    deadline = time.time() + 600
    while time.time() < deadline:  # the progress bar of process 0: stop it a few steps in
        chunk = split.stdout.read1(4096)
        if not chunk:
            break
        seen += chunk
        done = [int(m) for m in re.findall(rb"(\d+)/%d \[" % steps, seen)]
        if done and max(done) >= 3 and not stopped:
            os.killpg(split.pid, signal.SIGTERM)  # local.sh passes it on and waits for the checkpoint
            stopped = True
    split.wait(timeout=300)
    assert stopped and split.returncode == 143, seen.decode(errors="replace")[-3000:]
    (first,) = checkpoint_steps(f"{gcs}/split")
    assert 3 <= first < steps
    resumed = _local_sh(f"{gcs}/split", overrides, tmp_path / "logs_resumed")
    out = resumed.communicate(timeout=600)[0].decode(errors="replace")
    assert resumed.returncode == 0, out[-3000:]
    assert checkpoint_steps(f"{gcs}/split") == [first, steps]
    for ema in (False, True):
        a, sa = restore_unet_params(f"{gcs}/full", ema=ema)
        b, sb = restore_unet_params(f"{gcs}/split", ema=ema)
        assert sa == sb == steps
        _assert_same(a, b)  # bit-identical
    samples = tmp_path / "samples"
    main(["sample", "--model", f"{gcs}/split", "--prompt", "a square number 1", "--steps", "2", "--out", str(samples)])
    assert sorted(os.listdir(samples)) == ["000_00.png", "grid.png"]


def test_bad_bucket_input_is_a_clear_error_and_loses_nothing(bucket_run, gcs):
    """A missing object, a truncated checkpoint object and an unreachable bucket each give a one-line
    error; nothing already in the bucket changes."""
    # an unreachable bucket (a closed port): a one-line StorageError naming the path, after the client's
    # retries (about 30 s of back-off, run beside the rest of the test)
    code = ("from ldm_jax import storage\n"
            "try:\n    storage.exists('gs://ldm-jax-test/x')\n"
            "except storage.StorageError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{_free_port()}")
    unreachable = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    run = f"{gcs}/bad"
    storage.copytree(bucket_run, run)  # a copy of a finished run, to damage
    before = {n: storage.read_bytes(f"{run}/{n}") for n in ("config.json", "frozen/vae.safetensors")}
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_model(f"{gcs}/no-such-model")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="config.init.pretrained") as err:
        D.DiffusionTask(load_config("tiny_train", _pretrained(f"{gcs}/no-such-model"))).start()
    # truncate the array data objects of the latest checkpoint: reading it is a one-line WeightsError.
    # All of them: which OCDBT data file holds the EMA params (what load_model reads) and which the
    # optimizer moments depends on the order the writer threads ran in
    def objects(prefix):
        for name in storage.listdir(prefix):
            yield from objects(f"{prefix}/{name}") if storage.isdir(f"{prefix}/{name}") else [f"{prefix}/{name}"]

    latest = checkpoint_steps(run)[-1]
    victims = [p for p in objects(f"{run}/checkpoints/{latest}/state") if "/d/" in p]
    assert victims
    for victim in victims:
        storage.write_bytes(victim, storage.read_bytes(victim)[:32])
    with pytest.raises(WeightsError, match=f"checkpoint of step {latest} .*cannot be read") as err:
        load_model(run, step=latest)  # by default a damaged latest falls back to an older one, if any
    assert "\n" not in str(err.value)
    assert {n: storage.read_bytes(f"{run}/{n}") for n in before} == before
    out, errs = unreachable.communicate(timeout=300)
    lines = [ln for ln in out.splitlines() if ln.startswith("ERR")]
    assert len(lines) == 1 and "gs://ldm-jax-test/x" in lines[0] and "reachable" in lines[0], out + errs
    assert "Traceback" not in errs, errs  # the client's retry log stays out of the user's terminal
