"""``ldm-jax bench sample|train|data``: benchmarks printed as JSON, with the PyTorch peer in the same run.

Each function returns a JSON-able dict. ``bench_sample`` times our jitted pipeline and diffusers'
PyTorch ``StableDiffusionPipeline`` on the same random SD-shaped model folder (same initial latents,
prompts, steps, guidance, sampler), so the ``speedup`` is a ratio measured on one machine in one
run. torch/diffusers are bench-only dependencies: imported lazily; when missing the peer is skipped
and the JSON says why.

CLI overrides (``--config.KEY=VALUE``) set keyword arguments of the bench function, e.g.
``ldm-jax bench sample --config.variant=v1 --config.sampler=euler --config.repeats=5``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

__all__ = ["bench_sample", "bench_train", "bench_data", "matmul_peak_gflops"]

BENCH_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "bench")
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE_PROMPT = ""

# our sampler name -> (diffusers scheduler class name, extra config for it)
_PEER_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
}


# ----------------------------------------------------------------------------- helpers


def _parse_overrides(overrides: Sequence[str], allowed: Sequence[str]) -> dict:
    """``["--config.sampler=euler", "--config.repeats=5"]`` -> ``{"sampler": "euler", "repeats": 5}``."""
    from ldm_jax.config_utils import parse_value

    out = {}
    for item in overrides or ():
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form --config.key=value")
        key = key[len("config."):] if key.startswith("config.") else key
        if key not in allowed:
            raise ValueError(f"override {item!r}: unknown bench option {key!r}; valid: {', '.join(sorted(allowed))}")
        out[key] = parse_value(value)
    return out


def _versions() -> dict:
    import jax

    v = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
    for mod in ("jaxlib", "flax", "optax", "torch", "diffusers", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is reported, not raised
            v[mod] = None
    return v


def _device_info(devices) -> dict:
    import jax

    d = devices[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "num_devices_total": jax.device_count(),
            "num_devices_used": len(devices), "cpu_count": os.cpu_count()}


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _torch_available() -> str | None:
    """None when torch and diffusers import, else the reason they do not."""
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def _resolve_model(config: str | None, variant: str, cache_dir: str | None) -> tuple[str, str]:
    """``config`` = a diffusers folder or a reference variant name -> (folder, label)."""
    from ldm_jax.reference import VARIANTS, write_reference_folder

    if config and os.path.isdir(config):
        return config, os.path.abspath(config)
    if config:
        if config not in VARIANTS:
            raise ValueError(f"bench sample: --config {config!r} is neither a model folder nor one of the "
                             f"reference variants {sorted(VARIANTS)}")
        variant = config
    if variant not in VARIANTS:
        raise ValueError(f"unknown reference variant {variant!r}; expected one of {sorted(VARIANTS)}")
    folder = os.path.join(cache_dir or BENCH_CACHE, variant)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        if _torch_available() is not None:
            raise RuntimeError(f"writing the reference model folder needs torch and diffusers ({_torch_available()})")
        write_reference_folder(folder, variant)
    return folder, variant


def _set_compilation_cache(path: str | None) -> str | None:
    """Point JAX's persistent compilation cache at ``path`` (re-initialising it); returns the old dir."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", path)
    if path:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    cc.reset_cache()
    # Drop in-memory executables too: otherwise programs compiled earlier in this process are
    # reused without being written to the new cache dir, and "cold" compile times are not cold.
    jax.clear_caches()
    return old


# Child process for the warm-cache figure: same model, same call, the cache dir of the first run.
_WARM_CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import jax
jax.config.update("jax_default_matmul_precision", args["precision"])
jax.config.update("jax_compilation_cache_dir", args["cache"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
import numpy as np
import jax.numpy as jnp
from jax.sharding import Mesh
from ldm_jax.pipeline import StableDiffusionPipeline
mesh = Mesh(np.array(jax.devices()[: args["devices"]]), ("data",))
pipe = StableDiffusionPipeline.from_pretrained(args["folder"], dtype=jnp.dtype(args["dtype"]),
                                               attention_impl=args["attention_impl"], mesh=mesh)
latents = np.load(args["latents"])
t0 = time.perf_counter()
pipe(args["prompts"], args["negatives"], height=args["height"], width=args["width"],
     num_inference_steps=args["steps"], guidance_scale=args["guidance_scale"], sampler=args["sampler"],
     latents=latents, output_type="np")
first = time.perf_counter() - t0
print("BENCH_RESULT " + json.dumps({"first_call_s": first}))
"""


def _warm_cache_first_call(child_args: dict, timeout: float = 900) -> dict:
    """Run :data:`_WARM_CHILD` in a fresh interpreter; its first-call seconds and new cache entries."""
    cache = child_args["cache"]
    before = len(os.listdir(cache))
    env = dict(os.environ)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", _WARM_CHILD, json.dumps(child_args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"warm-cache child failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("BENCH_RESULT "):])
    out["new_cache_entries"] = len(os.listdir(cache)) - before
    return out


# ----------------------------------------------------------------------------- bench sample


class _Ours:
    """Our pipeline on ``folder``: load, first (cold-compile) call, steady calls, the loop alone."""

    def __init__(self, folder, prompts, negatives, latents_nchw, steps, guidance_scale, sampler, height, width,
                 dtype, attention_impl):
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh

        from ldm_jax.pipeline import StableDiffusionPipeline

        self.args = dict(folder=folder, prompts=prompts, negatives=negatives, steps=steps,
                         guidance_scale=guidance_scale, sampler=sampler, height=height, width=width,
                         dtype=str(jnp.dtype(dtype)), attention_impl=attention_impl)
        self.latents = latents_nchw
        # A batch the devices cannot split is replicated: every device would redo the whole batch.
        self.n_dev = jax.device_count() if len(prompts) % jax.device_count() == 0 else 1
        self.devices = jax.devices()[: self.n_dev]
        t0 = time.perf_counter()
        self.pipe = StableDiffusionPipeline.from_pretrained(
            folder, dtype=jnp.dtype(dtype), attention_impl=attention_impl, mesh=Mesh(np.array(self.devices), ("data",)))
        self.load_s = time.perf_counter() - t0

    def call(self):
        a = self.args
        return self.pipe(a["prompts"], a["negatives"], height=a["height"], width=a["width"],
                         num_inference_steps=a["steps"], guidance_scale=a["guidance_scale"], sampler=a["sampler"],
                         latents=self.latents, output_type="np")

    def loop_fn(self):
        """The jitted denoising loop alone (no text encoding, no decoding), compiled and ready."""
        import jax
        import jax.numpy as jnp

        from ldm_jax.pipeline import _LoopKey

        a, pipe = self.args, self.pipe
        _, context, smp, shape, use_cfg = pipe._prepare(a["prompts"], a["negatives"], 1, a["height"], a["width"],
                                                        a["steps"], a["sampler"], a["guidance_scale"], None)
        x = pipe._shard(pipe._initial_noise(self.latents, shape, jax.random.key(0)) * smp.init_noise_sigma)
        loop = pipe._loop(_LoopKey(type(smp).__name__, int(a["steps"]), use_cfg, "txt2img"))
        args = (pipe.params["unet"], smp, x, context, jnp.float32(a["guidance_scale"]), jnp.float32(0.0),
                jax.random.key(1), jnp.int32(0), {})
        run = lambda: jax.block_until_ready(loop(*args))
        run()
        return run

    def warm_cache_first_call(self, xla_cache: str) -> dict:
        import jax

        fd, lat_path = tempfile.mkstemp(suffix=".npy")
        os.close(fd)
        try:
            np.save(lat_path, self.latents)
            return _warm_cache_first_call(dict(
                self.args, precision=str(jax.config.jax_default_matmul_precision or "default"), cache=xla_cache,
                devices=self.n_dev, latents=lat_path))
        finally:
            os.remove(lat_path)


class _Peer:
    """diffusers' PyTorch ``StableDiffusionPipeline`` on the same folder, latents, prompts and sampler."""

    def __init__(self, folder, prompts, negatives, latents_nchw, steps, guidance_scale, sampler, height, width):
        import diffusers
        import torch

        from ldm_jax.diffusion.samplers import ALIASES

        self.torch = torch
        torch.set_num_threads(os.cpu_count())
        t0 = time.perf_counter()
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32,
                                                                 safety_checker=None, requires_safety_checker=False)
        self.scheduler, extra = _PEER_SCHEDULERS[ALIASES.get(sampler, sampler)]
        pipe.scheduler = getattr(diffusers, self.scheduler).from_config(pipe.scheduler.config, **extra)
        pipe.set_progress_bar_config(disable=True)
        self.load_s = time.perf_counter() - t0
        self.pipe = pipe
        self.kw = dict(prompt=prompts, negative_prompt=negatives, height=height, width=width,
                       num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np")
        self.latents = latents_nchw
        self.step_ends: list[float] = []

    def _on_step_end(self, _pipe, i, t, kwargs):
        self.step_ends.append(time.perf_counter())
        return kwargs

    def call(self):
        self.step_ends = []
        with self.torch.inference_mode():
            return self.pipe(latents=self.torch.from_numpy(self.latents), generator=self.torch.Generator().manual_seed(0),
                             callback_on_step_end=self._on_step_end, **self.kw).images

    def last_step_s(self) -> float | None:
        """Seconds per denoising step in the last call (callbacks fire after each step)."""
        s = self.step_ends
        return (s[-1] - s[0]) / (len(s) - 1) if len(s) >= 2 else None


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_sample(config: str | None = None, overrides: Sequence[str] = (), batch: int | None = None,
                 steps: int | None = None, peer: bool = True, variant: str = "small", height: int | None = None,
                 width: int | None = None, guidance_scale: float = 7.5, sampler: str = "ddim", repeats: int = 3,
                 dtype: str = "float32", attention_impl: str = "auto", warm_cache: bool = True,
                 cache_dir: str | None = None, seed: int = 0) -> dict:
    """Time text-to-image sampling, ours vs diffusers' PyTorch pipeline, on one model folder.

    Args:
      config: a diffusers model folder, or a reference variant name (``ldm_jax.reference.VARIANTS``);
        default ``variant`` (``"small"``: SD-v1-shaped, 32x32 latents, 256x256 images), written once
        under ``cache_dir/<variant>`` (default ~/.cache/ldm_jax/bench).
      overrides: ``--config.KEY=VALUE`` strings setting any other keyword argument of this function.
      batch: images per call (default 2); steps: denoising steps (default 25).
      peer: also run diffusers' PyTorch ``StableDiffusionPipeline`` (same latents, prompts, steps,
        guidance, sampler; ``torch.set_num_threads(os.cpu_count())``).
      repeats: steady calls timed; medians are reported.
      warm_cache: time a first call in a fresh process that reuses this run's compilation cache.

    Returns:
      JSON-able dict. Seconds throughout: ``ours``/``peer`` each with ``first_call_s``,
      ``s_per_call``, ``s_per_image`` (median end to end incl. text encoding and VAE decoding),
      ``s_per_step`` (the denoising loop alone, one CFG step = 2 UNet rows per image); ours with
      ``compile_cold_s`` (first call minus a steady call, empty persistent cache) and
      ``compile_warm_cache_s`` (same in a new process with the warm cache); ``speedup`` =
      peer s/image / ours s/image; ``images_mean_abs_diff`` between the two outputs (same work check).
    """
    opts = dict(variant=variant, height=height, width=width, guidance_scale=guidance_scale, sampler=sampler,
                repeats=repeats, dtype=dtype, attention_impl=attention_impl, warm_cache=warm_cache,
                cache_dir=cache_dir, seed=seed, batch=batch, steps=steps)
    opts.update(_parse_overrides(overrides, list(opts)))
    batch = 2 if opts["batch"] is None else int(opts["batch"])
    steps = 25 if opts["steps"] is None else int(opts["steps"])
    if batch < 1 or steps < 1 or int(opts["repeats"]) < 1:
        raise ValueError(f"batch ({batch}), steps ({steps}) and repeats ({opts['repeats']}) must be >= 1")
    from ldm_jax.diffusion.samplers import ALIASES, sampler_class

    sampler_class(opts["sampler"])  # unknown sampler -> ValueError before any work
    if ALIASES.get(opts["sampler"], opts["sampler"]) not in _PEER_SCHEDULERS:
        raise ValueError(f"no diffusers peer scheduler for sampler {opts['sampler']!r}")

    folder, label = _resolve_model(config, opts["variant"], opts["cache_dir"])
    with open(os.path.join(folder, "unet", "config.json")) as f:
        unet_cfg = json.load(f)
    with open(os.path.join(folder, "vae", "config.json")) as f:
        vae_cfg = json.load(f)
    vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    height = int(opts["height"] or unet_cfg["sample_size"] * vae_scale)
    width = int(opts["width"] or unet_cfg["sample_size"] * vae_scale)
    latents = np.random.default_rng(opts["seed"]).standard_normal(
        (batch, vae_cfg.get("latent_channels", 4), height // vae_scale, width // vae_scale)).astype(np.float32)
    prompts, negatives = [PROMPT] * batch, [NEGATIVE_PROMPT] * batch
    common = dict(prompts=prompts, negatives=negatives, latents_nchw=latents, steps=steps,
                  guidance_scale=float(opts["guidance_scale"]), sampler=opts["sampler"], height=height, width=width,
                  repeats=int(opts["repeats"]))

    result: dict[str, Any] = {
        "bench": "sample", "model": label, "folder": folder, "batch": batch, "steps": steps,
        "height": height, "width": width, "latent_shape_nchw": list(latents.shape),
        "guidance_scale": common["guidance_scale"], "sampler": opts["sampler"], "repeats": common["repeats"],
        "versions": _versions(),
    }
    repeats = common.pop("repeats")
    missing = _torch_available() if peer else "disabled (--no-peer)"
    xla_cache = tempfile.mkdtemp(prefix="xla_", dir=_ensure_dir(os.path.join(opts["cache_dir"] or BENCH_CACHE, "xla")))
    old_cache = _set_compilation_cache(xla_cache)  # a fresh dir: our first call is a real cold compile
    try:
        ours = _Ours(folder, dtype=opts["dtype"], attention_impl=opts["attention_impl"], **common)
        first, our_images = _timed(ours.call)
        loop = ours.loop_fn()
        # Ours first, then the peer: in one process, torch's OpenMP threads and XLA's thread pool
        # slow each other down badly when calls alternate (measured: both 3-4x slower).
        t_ours, t_loop, t_peer, t_peer_step = [], [], [], []
        for _ in range(repeats):
            t_ours.append(_timed(ours.call)[0])
            t_loop.append(_timed(loop)[0])
        peer_run = _Peer(folder, **common) if missing is None else None
        if peer_run is not None:
            peer_first, peer_images = _timed(peer_run.call)
            for _ in range(repeats):
                t_peer.append(_timed(peer_run.call)[0])
                t_peer_step.append(peer_run.last_step_s())
        steady = statistics.median(t_ours)
        result["ours"] = {
            "load_s": ours.load_s, "first_call_s": first, "compile_cold_s": max(first - steady, 0.0),
            "s_per_call": steady, "s_per_image": steady / batch, "steady_calls_s": t_ours,
            "loop_s": statistics.median(t_loop), "s_per_step": statistics.median(t_loop) / steps,
            "attention_impl": ours.pipe.unet.attention_impl, "dtype": ours.args["dtype"],
        }
        result["device"] = _device_info(ours.devices)
        result["xla_cache_dir"] = xla_cache
        if opts["warm_cache"]:
            child = ours.warm_cache_first_call(xla_cache)
            result["ours"].update(first_call_warm_cache_s=child["first_call_s"],
                                  compile_warm_cache_s=max(child["first_call_s"] - steady, 0.0),
                                  warm_cache_new_entries=child["new_cache_entries"])
    finally:
        _set_compilation_cache(old_cache)
    if peer_run is None:
        result["peer"] = None
        result["peer_skipped"] = missing
        return result
    peer_steady = statistics.median(t_peer)
    steps_s = [t for t in t_peer_step if t is not None]
    result["peer"] = {
        "name": "diffusers.StableDiffusionPipeline (PyTorch)", "scheduler": peer_run.scheduler,
        "torch_threads": peer_run.torch.get_num_threads(), "load_s": peer_run.load_s, "first_call_s": peer_first,
        "warmup_s": max(peer_first - peer_steady, 0.0),  # eager: no compile, first-call warm-up only
        "s_per_call": peer_steady, "s_per_image": peer_steady / batch, "steady_calls_s": t_peer,
        "s_per_step": statistics.median(steps_s) if steps_s else None,
    }
    result["speedup"] = result["peer"]["s_per_image"] / result["ours"]["s_per_image"]
    if steps_s:
        result["step_speedup"] = result["peer"]["s_per_step"] / result["ours"]["s_per_step"]
    result["images_mean_abs_diff"] = float(np.mean(np.abs(np.asarray(our_images) - np.asarray(peer_images))))
    return result


def _ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- bench train / data


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 ``n x n x n`` matmul throughput of the default JAX device, GFLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
    jax.block_until_ready(f(a, b))
    t, _ = _median_time(lambda: jax.block_until_ready(f(a, b)), repeats)
    return 2 * n ** 3 / t / 1e9


def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _peer_train_step_s(config, latent_shape_nhwc, ctx_shape, steps: int) -> dict:
    """diffusers' PyTorch UNet, AdamW, MSE on eps: median seconds per step (after one warm-up step)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(config.unet).items()})
    unet.train()
    t = config.train
    opt = torch.optim.AdamW(unet.parameters(), lr=float(t.get("lr", 1e-4)), weight_decay=float(t.get("weight_decay", 0.0)))
    b, h, w, c = latent_shape_nhwc
    x0, ctx = torch.randn(b, c, h, w), torch.randn(*ctx_shape)

    def step():
        noise = torch.randn_like(x0)
        ts = torch.randint(0, 1000, (b,))
        loss = torch.nn.functional.mse_loss(unet(x0 + noise, ts, ctx).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()

    first, _ = _timed(step)
    times = [_timed(step)[0] for _ in range(steps)]
    return {"name": "diffusers.UNet2DConditionModel (PyTorch) AdamW step", "first_step_s": first,
            "s_per_step": statistics.median(times), "step_times_s": times, "torch_threads": torch.get_num_threads()}


def bench_train(config: str | None = None, overrides: Sequence[str] = (), batch: int | None = None,
                steps: int | None = None, peer: bool = True) -> dict:
    """Diffusion train-step throughput (``ldm_jax.train.diffusion``) vs diffusers' PyTorch UNet step.

    Args:
      config: a training config file (default ``configs/tiny_train.py``); ``overrides`` apply to it.
        The data source is forced to ``synthetic_latents`` (UNet step on precomputed latents, as the peer).
      batch: global batch (default: the first stage's); steps: timed steps (default 5).

    Returns: JSON-able dict: ``ours`` (``compile_s``, ``s_per_step``, ``images_per_s``,
    ``flops_per_step`` from XLA's cost analysis, ``mfu`` vs ``matmul_peak_gflops``), ``peer``
    (PyTorch, same UNet config, AdamW, MSE on eps; its MFU uses our FLOP count) and ``speedup``.
    """
    import jax

    from ldm_jax.config_utils import load_config
    from ldm_jax.train import diffusion, sharding

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(config or os.path.join(repo, "configs", "tiny_train.py"), overrides)
    cfg.data.source = "synthetic_latents"
    steps = 5 if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch is not None:
        cfg.stages = [dict(dict(cfg.stages[0]), batch_size=int(batch))] + list(cfg.stages[1:])
    stage = diffusion.get_stages(cfg)[0]
    b = stage.batch_size
    mesh = sharding.make_mesh(dict(cfg.get("mesh", {"data": -1})))
    ts = diffusion.setup(cfg, mesh)
    local = next(iter(diffusion.make_batch_source(cfg, stage, (0, b))))
    gbatch = sharding.make_global_batch(mesh, local, b)
    t0 = time.perf_counter()
    compiled = ts.step_fn.lower(ts.state, gbatch, ts.frozen).compile()
    compile_s = time.perf_counter() - t0
    flops = _cost_flops(compiled)
    state = ts.state
    state, m = compiled(state, gbatch, ts.frozen)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, gbatch, ts.frozen)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = matmul_peak_gflops()
    lat = local.get("latents")
    latent_shape = tuple(lat.shape) if lat is not None else (b, stage.resolution, stage.resolution, cfg.unet.in_channels)
    result: dict[str, Any] = {
        "bench": "train", "config": cfg.get("name", config), "batch": b, "steps": steps,
        "latent_shape_nhwc": list(latent_shape), "versions": _versions(), "device": _device_info(jax.devices()),
        "matmul_peak_gflops": peak,
        "ours": {"compile_s": compile_s, "s_per_step": step_s, "images_per_s": b / step_s, "step_times_s": times,
                 "flops_per_step": flops, "mfu": flops / step_s / (peak * 1e9) if flops else None,
                 "compute_dtype": cfg.train.get("compute_dtype", "float32"), "loss": float(m["loss"])},
    }
    missing = _torch_available() if peer else "disabled (--no-peer)"
    if missing is not None:
        result["peer"], result["peer_skipped"] = None, missing
        return result
    ctx_shape = (b, int(cfg.text_encoder.get("max_position_embeddings", 77)), int(cfg.unet.cross_attention_dim))
    p = _peer_train_step_s(cfg, latent_shape, ctx_shape, steps)
    p.update(images_per_s=b / p["s_per_step"], mfu=flops / p["s_per_step"] / (peak * 1e9) if flops else None)
    result["peer"] = p
    result["speedup"] = p["s_per_step"] / step_s
    return result


def bench_data(config: str | None = None, overrides: Sequence[str] = (), batch: int | None = None,
               steps: int | None = None, peer: bool = True, **kwargs) -> dict:
    """Data-pipeline images/s (:func:`ldm_jax.data.bench.bench_data`); ``batch`` is the batch size.

    ``overrides`` (``--config.image_size=512`` ...) set that function's keyword arguments.
    """
    from ldm_jax.data import bench as data_bench

    opts = dict(kwargs)
    opts.update(_parse_overrides(overrides, ("image_size", "num_images", "source_size", "num_threads", "seed",
                                             "workdir")))
    if batch is not None:
        opts["batch_size"] = batch
    return dict(data_bench.bench_data(**opts), bench="data")
