"""The training workdir: its layout, written by the training loop and read back as a model source.

This module is the only one that knows the layout; the loop writes through it and
:func:`ldm_jax.convert.load_model` reads through :func:`load_workdir`::

  workdir/config.json                     the resolved training config (rewritten at every start)
  workdir/checkpoints/<step>/state|meta   orbax checkpoints (train state; loop metadata: stage, data position)
  workdir/tensorboard/                    TensorBoard scalars and previews
  workdir/frozen/text_encoder.safetensors diffusion: the frozen text encoder params (Flax layout, '/' keys;
                                          absent when it trains with the UNet: then it is in the checkpoints)
  workdir/frozen/vae.safetensors          diffusion: the frozen VAE params (absent when trained on latents)
  workdir/frozen/unet.safetensors         LoRA / textual inversion: the frozen UNet
  workdir/tokenizer/                      diffusion: a copy of ``config.tokenizer`` when that is a local folder
  workdir/lock.json                       the running trainer (host, pid): one writer per workdir

The frozen encoders are written once, when the workdir is created (a resumed run keeps them):
whatever the trainer was given, in-memory params included, sampling gets the same weights.
Loading restores only the UNet (``ema_params`` or ``params``; with the text encoder when that
trained) of one checkpoint, as host numpy arrays: no training mesh, no optimizer state, any device count. A LoRA run's checkpoints hold the
adapters: loading merges them into the frozen base UNet (and text encoder) at ``alpha / rank``; a
textual-inversion run's hold the placeholder's embeddings, set into the frozen text encoder (its
tokenizer, with the placeholder, is ``workdir/tokenizer``); :func:`export_adapter` writes either
as diffusers does.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import storage
from ldm_jax.convert.checkpoint_io import load_state_dict, save_state_dict
from ldm_jax.convert.diffusers_folder import LoadedModel, _make_config, build_configs_and_shapes
from ldm_jax.convert.torch_flax import WeightsError
from ldm_jax.errors import WorkdirLocked
from ldm_jax.train.checkpoint import CheckpointManager, describe_error, quiet_orbax

__all__ = ["CONFIG_FILE", "FROZEN_DIR", "LOCK_FILE", "WorkdirLocked", "WorkdirLock", "TOKENIZER_DIR", "CHECKPOINTS_DIR", "TENSORBOARD_DIR", "is_training_workdir",
           "write_config", "write_frozen", "tensorboard_dir", "open_checkpoints", "checkpoint_steps", "restore_unet_params",
           "write_tokenizer", "load_workdir", "export_adapter",
           "is_autoencoder_workdir", "load_autoencoder_workdir"]

CONFIG_FILE = "config.json"
FROZEN_DIR = "frozen"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = "lock.json"
TENSORBOARD_DIR = "tensorboard"
_FROZEN_FILES = {"text": "text_encoder.safetensors", "vae": "vae.safetensors", "unet": "unet.safetensors"}
_FORMAT = {"format": "flax", "writer": "ldm_jax.train.workdir"}


def is_training_workdir(path: str | os.PathLike) -> bool:
    """A folder (local or ``gs://``) with ``checkpoints/`` (or the loop's ``config.json`` + ``frozen/``),
    not a diffusers folder."""
    path = os.fspath(path)
    names = set(storage.listdir(path)) if storage.is_remote(path) or os.path.isdir(path) else set()
    if not names or "model_index.json" in names:
        return False
    return CHECKPOINTS_DIR in names or {CONFIG_FILE, FROZEN_DIR} <= names


# ----------------------------------------------------------------------------------------- writing (trainer)
def _host_tree(tree: Any) -> Any:
    """Device arrays (possibly sharded over processes) -> numpy; a collective when multi-host."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(get, tree)


def _flatten(tree: Mapping) -> dict[str, Any]:
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(tree), sep="/")


def _config_json(config) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def write_config(workdir: str, config) -> None:
    """``workdir/config.json``: the resolved config, rewritten at every start (process 0, atomic)."""
    if jax.process_index() != 0:
        return
    storage.write_json(storage.join(workdir, CONFIG_FILE), _config_json(config))


def write_frozen(workdir: str, config, frozen: Mapping[str, Any]) -> None:
    """The frozen encoders' params (``frozen["text"]``, ``frozen["vae"]``; None entries skipped) and a
    copy of the ``config.tokenizer`` folder (local or remote), each only when missing: the workdir
    becomes a model source. Every process must call it (gathering params sharded over hosts is a
    collective); process 0 writes."""
    multi = jax.process_count() > 1
    frozen_dir = storage.join(workdir, FROZEN_DIR)
    wanted = {k: f for k, f in _FROZEN_FILES.items() if frozen.get(k) is not None}
    present = set(storage.listdir(frozen_dir))
    missing = any(f not in present for f in wanted.values())
    if multi:  # every process takes the same branch (the gather below is a collective)
        from jax.experimental import multihost_utils

        missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
    host = {k: _host_tree(frozen[k]) for k in wanted} if missing else {}
    # a bf16 LoRA base is stored as float32 (safetensors' numpy writer has no bfloat16)
    host = {k: jax.tree.map(lambda x: x.astype(np.float32) if x.dtype == jnp.bfloat16 else x, v) for k, v in host.items()}
    if jax.process_index() != 0:
        return
    for key, params in host.items():
        if wanted[key] not in present:
            save_state_dict(_flatten(params), storage.join(frozen_dir, wanted[key]), metadata=_FORMAT)  # atomic
    tok = config.get("tokenizer") if hasattr(config, "get") else None
    dst = storage.join(workdir, TOKENIZER_DIR)
    if isinstance(tok, str) and (storage.is_remote(tok) or os.path.isdir(tok)) and storage.isdir(tok) \
            and not storage.isdir(dst):
        if storage.is_remote(dst):
            storage.copytree(tok, dst)  # objects: each file appears whole
        else:
            storage.copytree(tok, dst + ".tmp")
            os.replace(dst + ".tmp", dst)


def write_tokenizer(workdir: str, tokenizer) -> None:
    """``workdir/tokenizer`` from a :class:`~ldm_jax.models.tokenizer.PromptTokenizer` (a textual-inversion
    run's, with its placeholder), when missing; process 0 writes."""
    import tempfile

    dst = storage.join(workdir, TOKENIZER_DIR)
    if jax.process_index() != 0 or storage.isdir(dst):
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if storage.is_remote(dst):
            storage.copytree(tmp, dst)
        else:
            storage.copytree(tmp, dst + ".tmp")
            os.replace(dst + ".tmp", dst)


def tensorboard_dir(workdir: str) -> str:
    return storage.join(workdir, TENSORBOARD_DIR)


def open_checkpoints(workdir: str, train) -> CheckpointManager:
    """The checkpoint manager of ``workdir/checkpoints`` with a config's ``train`` section's policy
    (``checkpoint_every``, ``keep_checkpoints``, ``keep_every``, ``async_checkpoints``)."""
    return CheckpointManager(storage.join(workdir, CHECKPOINTS_DIR), save_every=int(train.checkpoint_every),
                             keep_last=int(train.keep_checkpoints), keep_every=int(train.keep_every) or None,
                             async_save=bool(train.async_checkpoints))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class WorkdirLock:
    """``workdir/lock.json``: one trainer per workdir (process 0 of a run holds it for all its processes).

    The file names its owner (host, pid, start time). A second trainer is refused with a
    :class:`WorkdirLocked` naming the owner; a lock whose owner is a dead process of this host is
    stale and taken over with a warning. Local files are created exclusively (``O_EXCL``); on a
    bucket the lock is written when absent and read back to check that this trainer won.
    """

    def __init__(self, workdir: str):
        import socket
        import uuid

        self.workdir = os.fspath(workdir)
        self.path = storage.join(self.workdir, LOCK_FILE)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                     "token": uuid.uuid4().hex}
        self.held = False

    def _refusal(self, owner: dict) -> WorkdirLocked:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("started", 0))))
        return WorkdirLocked(f"workdir {self.workdir} is in use by another trainer (pid {owner.get('pid')} on "
                             f"{owner.get('host')}, since {since}); stop it, or delete {self.path} if it is dead")

    def _stale(self, owner: dict) -> bool:
        return owner.get("host") == self.info["host"] and not _pid_alive(owner.get("pid", -1))

    def _read_owner(self) -> dict | None:
        try:
            return storage.read_json(self.path)
        except FileNotFoundError:
            return None
        except ValueError:  # a half-written lock of a trainer killed while writing it: stale
            return {}

    def acquire(self) -> "WorkdirLock":
        data = json.dumps(self.info).encode()
        for _ in range(3):
            owner = self._read_owner()
            if owner is not None:
                if owner and not self._stale(owner):
                    raise self._refusal(owner)
                logging.warning("workdir %s: taking over the stale lock of pid %s on %s (not running)",
                                self.workdir, owner.get("pid"), owner.get("host"))
                if storage.is_remote(self.path):
                    storage.remove(self.path)
                else:  # a rename only one of several racing trainers wins
                    try:
                        os.replace(self.path, f"{self.path}.stale-{self.info['token']}")
                        os.remove(f"{self.path}.stale-{self.info['token']}")
                    except FileNotFoundError:
                        pass
            if storage.is_remote(self.path):
                storage.write_bytes(self.path, data)
                if (self._read_owner() or {}).get("token") == self.info["token"]:
                    self.held = True
                    return self
                continue
            os.makedirs(self.workdir, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.held = True
            return self
        raise self._refusal(self._read_owner() or {})

    def release(self) -> None:
        if self.held and (self._read_owner() or {}).get("token") == self.info["token"]:
            storage.remove(self.path)
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------- reading
def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the complete (finalised) checkpoints in ``workdir/checkpoints``, ascending."""
    ckpt_dir = storage.join(os.fspath(workdir), CHECKPOINTS_DIR)
    steps = []
    for name in storage.listdir(ckpt_dir):  # orbax writes <step>.orbax-checkpoint-tmp-* and renames when done
        if name.isdigit() and "state" in storage.listdir(storage.join(ckpt_dir, name)):
            steps.append(int(name))
    return sorted(steps)


def restore_unet_params(workdir: str | os.PathLike, step: int | None = None, *, ema: bool = True
                        ) -> tuple[dict, int]:
    """``(UNet params as numpy arrays, step)`` from checkpoint ``step`` (default: the newest complete
    one that can be read; a newer one that cannot is skipped with a warning naming it and why).

    Only the ``ema_params`` (``ema=True``) or ``params`` subtree is read, onto the host: the mesh
    the run trained on, its optimizer state and its device count do not matter.

    Raises:
      FileNotFoundError: no complete checkpoint, or ``step`` is not among them.
      WeightsError: the checkpoint (``step``, or every one) cannot be read (corrupt, truncated, not a
        diffusion train state).
    """
    return _restore_params(workdir, step, "ema_params" if ema else "params", "a diffusion train state")


def _restore_params(workdir: str | os.PathLike, step: int | None, key: str, kind: str) -> tuple[dict, int]:
    """The ``key`` subtree of checkpoint ``step`` (or the newest readable one) as numpy, and its step."""
    workdir = os.fspath(workdir)
    steps = checkpoint_steps(workdir)
    ckpt_dir = storage.join(workdir, CHECKPOINTS_DIR)
    if not steps:
        raise FileNotFoundError(f"training workdir {workdir!r} has no complete checkpoint in {ckpt_dir!r} "
                                f"(training not started, or stopped before its first save finished)")
    if step is not None and int(step) not in steps:
        raise FileNotFoundError(f"training workdir {workdir!r} has no complete checkpoint of step {step}; "
                                f"complete checkpoints: {steps}")
    candidates = [int(step)] if step is not None else steps[::-1]
    reasons = []
    with quiet_orbax():  # its warnings about read-only managers
        mngr = CheckpointManager(ckpt_dir, read_only=True)
        try:
            for s in candidates:
                try:
                    params = mngr.restore_subtree(s, key)
                except KeyError as e:
                    raise WeightsError(f"{e.args[0]}; is it {kind}?") from None
                except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
                    reasons.append((s, describe_error(e)))
                    if step is None:
                        logging.warning("checkpoint of step %d in %s cannot be read (%s): using the one before it",
                                        s, ckpt_dir, describe_error(e))
                    continue
                return jax.tree.map(np.asarray, dict(params)), s
        finally:
            mngr.close()
    if step is not None:
        raise WeightsError(f"checkpoint of step {step} in {ckpt_dir!r} cannot be read (corrupt or truncated?): "
                           f"{reasons[0][1]}")
    raise WeightsError(f"checkpoints in {ckpt_dir!r} cannot be read (corrupt or truncated?): "
                       + "; ".join(f"step {s}: {why}" for s, why in reasons))


def is_autoencoder_workdir(path: str | os.PathLike) -> bool:
    """A training workdir of the autoencoder task (its ``config.json`` says ``task: autoencoder``)."""
    path = os.fspath(path)
    if not is_training_workdir(path) or not storage.isfile(storage.join(path, CONFIG_FILE)):
        return False
    return _read_config(path).get("task") == "autoencoder"


def load_autoencoder_workdir(path: str | os.PathLike, step: int | None = None) -> tuple[dict, dict, int]:
    """An autoencoder training workdir's VAE: ``(vae config, params as numpy, step)`` of checkpoint
    ``step`` (default the newest readable one), e.g. the first stage a diffusion run then trains on
    (``config.init.vae``)."""
    workdir = os.fspath(path)
    cfg = _read_config(workdir)
    if cfg.get("task") != "autoencoder" or "vae" not in cfg:
        raise WeightsError(f"{workdir!r} is not an autoencoder training workdir (its {CONFIG_FILE} has task "
                           f"{cfg.get('task')!r})")
    params, step = _restore_params(workdir, step, "params", "an autoencoder train state")
    if "ae" not in params:
        raise WeightsError(f"checkpoint {step} in {workdir!r} holds {sorted(params)}, not an autoencoder's 'ae' params")
    configs, shapes = build_configs_and_shapes({"vae": cfg.vae.to_dict()}, storage.join(workdir, CONFIG_FILE))
    _check_tree(params["ae"], shapes["vae"], f"autoencoder params of checkpoint {step} in {workdir!r}")
    return dict(cfg.vae.to_dict(), **configs["vae"]), params["ae"], step


def _read_config(workdir: str) -> ml_collections.ConfigDict:
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.isfile(path):
        raise WeightsError(f"training workdir {workdir!r} has no {CONFIG_FILE} (written by the training "
                           f"loop when a run starts; this workdir predates it or was not written by ldm_jax)")
    try:
        return ml_collections.ConfigDict(storage.read_json(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path!r} is not valid JSON: {e}") from None


def _model_shapes(workdir: str, cfg) -> tuple[dict, dict]:
    """The networks' configs and parameter shapes of a workdir's config.json."""
    for comp in ("unet", "vae", "text_encoder"):
        if comp not in cfg:
            raise WeightsError(f"{storage.join(workdir, CONFIG_FILE)} has no {comp!r} section")
    return build_configs_and_shapes({k: cfg[k].to_dict() for k in ("unet", "vae", "text_encoder")},
                                    storage.join(workdir, CONFIG_FILE))


def _check_tree(params: Mapping, shapes: Mapping, what: str) -> None:
    """``params`` must have the keys and shapes of the ``jax.eval_shape`` tree ``shapes``."""
    got = {k: tuple(np.shape(v)) for k, v in _flatten(params).items()}
    want = {k: tuple(v.shape) for k, v in _flatten(shapes).items()}
    if got == want:
        return
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    detail = "; ".join(s for s in (
        f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
        ", ".join(f"{k}: {got[k]} vs config {want[k]}" for k in wrong[:5])) if s)
    raise WeightsError(f"{what} does not fit the workdir's config.json: {detail}")


def _read_frozen(workdir: str, key: str, shapes: Mapping) -> dict:
    from flax import traverse_util

    path = storage.join(workdir, FROZEN_DIR, _FROZEN_FILES[key])
    if not storage.isfile(path):
        why = (" (the run trained on precomputed latents, so the trainer had no VAE)" if key == "vae" else "")
        raise WeightsError(f"training workdir {workdir!r} has no frozen {key} params ({path!r} is missing"
                           f"{why}); a diffusion training workdir holds them")
    params = traverse_util.unflatten_dict(load_state_dict(storage.local_copy(path)), sep="/")
    _check_tree(params, shapes, path)
    return params


def load_workdir(path: str | os.PathLike, *, step: int | None = None, ema: bool = True,
                 dtype: Any = None) -> LoadedModel:
    """A training workdir -> :class:`LoadedModel` (UNet of one checkpoint + frozen VAE and text encoder).

    Args:
      path: the ``workdir`` of a diffusion training run.
      step: checkpoint step (default: the latest complete checkpoint).
      ema: the EMA UNet weights (default) or the raw trained ones (``False``).
      dtype: dtype of the returned floating params (default: as stored, float32).

    The config's scheduler carries the trained ``prediction_type`` (``config.train.prediction_type``
    when set); the tokenizer is ``workdir/tokenizer`` when the trainer copied one, else
    ``config.tokenizer`` (a hub id, or None: then give the pipeline a tokenizer).

    Raises:
      FileNotFoundError: no complete checkpoint / no checkpoint of ``step``.
      WeightsError: no config.json, missing frozen params, unreadable checkpoint, params that do not
        fit the config.
    """
    workdir = os.fspath(path)
    cfg = _read_config(workdir)
    configs, shapes = _model_shapes(workdir, cfg)
    unet, step = restore_unet_params(workdir, step, ema=ema)
    what = _trained(cfg)
    if _joint_text(cfg):  # the text encoder trained with the UNet: both in the checkpoint
        if set(unet) != {"unet", "text_encoder"}:
            raise WeightsError(f"checkpoint {step} in {workdir!r}: a run with train.train_text_encoder holds "
                               f"{{unet, text_encoder}}, got {sorted(unet)}")
        unet, text = unet["unet"], unet["text_encoder"]
        _check_tree(text, shapes["text_encoder"], f"text encoder {'EMA ' if ema else ''}params of checkpoint "
                                                  f"{step} in {workdir!r}")
    else:
        text = _read_frozen(workdir, "text", shapes["text_encoder"])
    if what == "lora":
        unet, text = _merge_adapters(cfg, unet, _read_frozen(workdir, "unet", shapes["unet"]), text,
                                     f"LoRA adapters of checkpoint {step} in {workdir!r}")
    elif what == "textual_inversion":
        unet, text = _with_embeddings(cfg, unet, _read_frozen(workdir, "unet", shapes["unet"]), text,
                                      f"learned embeddings of checkpoint {step} in {workdir!r}")
    _check_tree(unet, shapes["unet"], f"UNet {'EMA ' if ema else ''}params of checkpoint {step} in {workdir!r}")
    params = {"unet": unet, "vae": _read_frozen(workdir, "vae", shapes["vae"]), "text_encoder": text}
    if dtype is not None:
        dt = jnp.dtype(dtype)
        params = jax.tree.map(lambda x: x.astype(dt) if np.issubdtype(x.dtype, np.floating) else x, params)

    scheduler = cfg.scheduler.to_dict() if "scheduler" in cfg else {}
    trained = cfg.train.get("prediction_type") if "train" in cfg else None
    if trained:  # the trainer's override of the scheduler's prediction type
        scheduler["prediction_type"] = trained
    tok_dir = storage.join(workdir, TOKENIZER_DIR)
    tokenizer_path = storage.local_copy(tok_dir) if storage.isdir(tok_dir) else None  # tokenizers read local files
    name = f"{os.path.basename(os.path.normpath(workdir.rstrip('/')))}-step{step}{'' if ema else '-raw'}"
    config = _make_config(name, configs, scheduler, tokenizer_path or cfg.get("tokenizer"))
    stages = cfg.get("stages") or []
    if stages and "latents" not in str(cfg.get("data", {}).get("source", "")):
        res = int(stages[-1]["resolution"])
        config.sample.height = config.sample.width = res
    config.checkpoint = dict(workdir=workdir if storage.is_remote(workdir) else os.path.abspath(workdir), step=step,
                             ema=bool(ema))
    return LoadedModel(config, params, tokenizer_path, workdir)


def _joint_text(cfg) -> bool:
    """Whether a diffusion run trained its text encoder with the UNet (``config.train.train_text_encoder``)."""
    return bool(cfg.train.get("train_text_encoder", False)) if "train" in cfg else False


def _trained(cfg) -> str:
    """What a diffusion run trained (``config.train.trainable``): "unet", "lora" or "textual_inversion"."""
    return cfg.train.get("trainable", "unet") if "train" in cfg else "unet"


def _with_embeddings(cfg, trained: Mapping, base_unet: Mapping, text: Mapping, what: str) -> tuple[dict, dict]:
    """The frozen UNet and the text encoder with a textual-inversion run's learned rows."""
    from ldm_jax.models.textual_inversion import with_rows

    rows = trained.get("token_embeds")
    n, vocab = int(cfg.textual_inversion.num_vectors), int(cfg.text_encoder.vocab_size)
    if rows is None or tuple(np.shape(rows)) != (n, int(cfg.text_encoder.hidden_size)):
        raise WeightsError(f"{what}: expected token_embeds [{n}, {cfg.text_encoder.hidden_size}], got "
                           f"{None if rows is None else np.shape(rows)}")
    return dict(base_unet), jax.tree.map(np.asarray, with_rows(text, np.arange(vocab - n, vocab), rows))


def _merge_adapters(cfg, adapters: Mapping, base_unet: Mapping, text: Mapping, what: str) -> tuple[dict, dict]:
    """The base UNet and text encoder with a LoRA run's adapters merged at ``alpha / rank`` (numpy)."""
    from ldm_jax.models import lora as lora_lib

    if set(adapters) != {"unet", "text_encoder"}:
        raise WeightsError(f"{what}: expected LoRA adapters {{unet, text_encoder}}, got {sorted(adapters)}")
    scale = float(cfg.lora.alpha) / int(cfg.lora.rank)
    try:
        unet = lora_lib.merge(base_unet, [(adapters["unet"], scale)])
        if adapters["text_encoder"]:
            text = lora_lib.merge(text, [(adapters["text_encoder"], scale)])
    except ValueError as e:
        raise WeightsError(f"{what}: {e}") from None
    return jax.tree.map(np.asarray, unet), jax.tree.map(np.asarray, text)


def export_adapter(workdir: str | os.PathLike, out: str, *, step: int | None = None, ema: bool = True) -> str:
    """What a LoRA or textual-inversion run trained, from checkpoint ``step`` (default the latest; EMA
    unless ``ema=False``), in diffusers' layout at ``out`` (a ``.safetensors`` file or a folder): the
    adapters as ``pytorch_lora_weights.safetensors`` (:func:`ldm_jax.convert.lora.write_lora`), the
    placeholder's vectors as ``learned_embeds.safetensors``. Returns the file written. ValueError when
    the workdir trained the whole UNet."""
    workdir = os.fspath(workdir)
    cfg = _read_config(workdir)
    what = _trained(cfg)
    if what == "unet":
        raise ValueError(f"training workdir {workdir!r} trained the whole UNet, not LoRA adapters or embeddings "
                         f"(export it with `ldm-jax convert` without --adapter)")
    trained, step = restore_unet_params(workdir, step, ema=ema)
    if what == "textual_inversion":
        from ldm_jax.convert.textual_inversion import write_learned_embeds

        return write_learned_embeds(out, cfg.textual_inversion.placeholder_token, trained["token_embeds"])
    from ldm_jax.convert.lora import write_lora

    _, shapes = _model_shapes(workdir, cfg)
    return write_lora(out, trained, rank=int(cfg.lora.rank), alpha=float(cfg.lora.alpha),
                      dropout=float(cfg.lora.dropout), base={"unet": shapes["unet"], "text_encoder": shapes["text_encoder"]})
