"""``ldm-jax bench sample|train|data``: benchmarks printed as JSON, with the PyTorch peer in the same run.

Each function returns a JSON-able dict. ``bench_sample`` times our jitted pipeline and diffusers'
PyTorch ``StableDiffusionPipeline`` on the same random SD-shaped model folder (same initial latents,
prompts, steps, guidance, sampler), each side in its own process, alternating for several rounds,
both pinned to the same CPUs and thread count, so the ``speedup`` is a ratio measured on one
machine in one run; the JSON records the load average and the CPU share other processes took
meanwhile, so a measurement on a busy machine shows as such. torch/diffusers are bench-only
dependencies: imported lazily; when missing the peer is skipped
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
from typing import Any, Callable, Sequence

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


def _cpu_set(threads: int | None) -> tuple[list[int], int]:
    """The CPUs both sides are pinned to (the first ``threads`` of ours) and their count."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no pinning, thread counts only
        allowed = list(range(os.cpu_count() or 1))
    n = len(allowed) if threads is None else int(threads)
    if not 1 <= n <= len(allowed):
        raise ValueError(f"threads={threads}: this process may use {len(allowed)} CPU(s)")
    return allowed[:n], n


def _busy_jiffies() -> int | None:
    """CPU time (clock ticks) all processes of the machine spent so far, from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait
        return sum(int(v) for i, v in enumerate(fields[1:9]) if i not in (3, 4))
    except (OSError, ValueError, IndexError):
        return None


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


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
            folder, dtype=jnp.dtype(dtype), attention_impl=attention_impl, mesh=Mesh(np.array(self.devices), ("data",)),
            compilation_cache=False)  # the worker set its own cache dir
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


class _Peer:
    """diffusers' PyTorch ``StableDiffusionPipeline`` on the same folder, latents, prompts and sampler."""

    def __init__(self, folder, prompts, negatives, latents_nchw, steps, guidance_scale, sampler, height, width,
                 threads):
        import diffusers
        import torch

        from ldm_jax.diffusion.samplers import ALIASES

        self.torch = torch
        torch.set_num_threads(int(threads))
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


def _sample_worker(args: dict) -> dict:
    """One side of ``bench_sample`` in its own process: load, first call, ``calls`` steady calls."""
    latents = np.load(args["latents"])
    common = dict(folder=args["folder"], prompts=args["prompts"], negatives=args["negatives"], latents_nchw=latents,
                  steps=args["steps"], guidance_scale=args["guidance_scale"], sampler=args["sampler"],
                  height=args["height"], width=args["width"])
    out: dict[str, Any] = {"side": args["side"], "pid": os.getpid()}
    try:
        out["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    except AttributeError:
        out["cpu_affinity"] = None
    if args["side"] == "ours":
        import jax

        jax.config.update("jax_default_matmul_precision", args["precision"])
        jax.config.update("jax_compilation_cache_dir", args["cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        before = len(os.listdir(args["cache"]))
        run = _Ours(dtype=args["dtype"], attention_impl=args["attention_impl"], **common)
        first, images = _timed(run.call)
        out.update(new_cache_entries=len(os.listdir(args["cache"])) - before, device=_device_info(run.devices),
                   attention_impl=run.pipe.unet.attention_impl, dtype=run.args["dtype"],
                   compiler_options=run.pipe.compiler_options)
        steady = [_timed(run.call)[0] for _ in range(args["calls"])]
        loop = run.loop_fn() if args["calls"] else None
        out["loop_s"] = [_timed(loop)[0] for _ in range(args["calls"])]
    else:
        run = _Peer(threads=args["threads"], **common)
        first, images = _timed(run.call)
        steady, step_s = [], []
        for _ in range(args["calls"]):
            steady.append(_timed(run.call)[0])
            step_s.append(run.last_step_s())
        out.update(scheduler=run.scheduler, torch_threads=run.torch.get_num_threads(), step_s=step_s)
    out.update(load_s=run.load_s, first_call_s=first, steady_calls_s=steady)
    if args.get("images_out"):
        np.save(args["images_out"], np.asarray(images, np.float32))
    return out


# Pins the process before anything starts a thread (numpy's BLAS, XLA, torch): threads inherit the mask.
_WORKER_CODE = ("import json, os, sys; a = json.loads(sys.argv[1]); "
                "a.get('cpus') and hasattr(os, 'sched_setaffinity') and os.sched_setaffinity(0, a['cpus']); "
                "from ldm_jax.bench import _worker_main; _worker_main()")


def _worker_main() -> None:
    """Entry point of a worker process (:data:`_WORKER_CODE`) -> one ``BENCH_RESULT {json}`` line."""
    args = json.loads(sys.argv[1])
    print("BENCH_RESULT " + json.dumps(_sample_worker(args)), flush=True)


def _run_worker(args: dict, threads: int, timeout: float) -> dict:
    """Run :func:`_sample_worker` in a fresh interpreter; its result plus what the machine did meanwhile."""
    env = dict(os.environ)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    load_before = list(os.getloadavg())
    busy0, cpu0, t0 = _busy_jiffies(), _children_cpu_s(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WORKER_CODE, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
    busy1 = _busy_jiffies()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench sample {args['side']} worker failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("BENCH_RESULT "):])
    out.update(process_wall_s=wall, process_cpu_s=cpu, load_avg_before=load_before)
    if busy0 is not None and busy1 is not None:
        # CPU seconds that processes other than the worker used meanwhile: > 0 means a shared machine
        others = max((busy1 - busy0) / os.sysconf("SC_CLK_TCK") - cpu, 0.0)
        out.update(others_cpu_s=others, others_cpu_frac=others / (wall * (os.cpu_count() or 1)))
    return out


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def bench_sample(config: str | None = None, overrides: Sequence[str] = (), batch: int | None = None,
                 steps: int | None = None, peer: bool = True, variant: str = "small", height: int | None = None,
                 width: int | None = None, guidance_scale: float = 7.5, sampler: str = "ddim", repeats: int = 3,
                 calls: int = 2, threads: int | None = None, dtype: str = "float32", attention_impl: str = "auto",
                 warm_cache: bool = True, cache_dir: str | None = None, seed: int = 0,
                 timeout: float = 1800.0) -> dict:
    """Time text-to-image sampling, ours vs diffusers' PyTorch pipeline, on one model folder.

    Each side runs in its own fresh process, in turn: ours, peer, ours, peer, ... for ``repeats``
    rounds, so neither side's thread pool competes with the other's and a burst of load from other
    processes hits both sides alike. Both processes are pinned to the same ``threads`` CPUs
    (``sched_setaffinity``, which also sizes XLA's CPU thread pool), with
    ``torch.set_num_threads(threads)`` and ``OMP_NUM_THREADS=threads``. Same latents, prompts,
    steps, guidance and sampler on both sides.

    Args:
      config: a diffusers model folder, or a reference variant name (``ldm_jax.reference.VARIANTS``);
        default ``variant`` (``"small"``: SD-v1-shaped, 32x32 latents, 256x256 images), written once
        under ``cache_dir/<variant>`` (default ~/.cache/ldm_jax/bench).
      overrides: ``--config.KEY=VALUE`` strings setting any other keyword argument of this function.
      batch: images per call (default 2); steps: denoising steps (default 25).
      peer: also run diffusers' PyTorch ``StableDiffusionPipeline``.
      repeats: rounds (one process per side each); calls: timed steady calls per process.
      threads: CPUs (and threads) per side; default all CPUs this process may use.
      warm_cache: ours' first round compiles into an empty persistent cache (``compile_cold_s``);
        later rounds reuse it (``compile_warm_cache_s``); with ``repeats=1`` one more untimed ours
        process measures the warm-cache first call.

    Returns:
      JSON-able dict. Seconds throughout: ``ours``/``peer`` each with ``first_call_s``,
      ``s_per_call``, ``s_per_image`` (medians over all ``repeats * calls`` steady calls, end to end
      incl. text encoding and VAE decoding; every sample in ``steady_calls_s``), ``s_per_step`` (the
      denoising loop alone, one CFG step = 2 UNet rows per image); ours with ``compile_cold_s`` and
      ``compile_warm_cache_s``; ``speedup`` = peer s/image / ours s/image (and per round in
      ``speedup_per_round``); ``best_s_per_call`` per side and ``speedup_best``, their ratio (the
      fastest steady calls, robust to the machine's slow spells); ``images_mean_abs_diff`` (same-work check); ``threads``,
      ``cpu_affinity``; ``load_avg`` at ``start``/``end`` (1, 5, 15 min) and, per worker process in
      ``rounds``, ``others_cpu_frac``: the share of the machine's CPU time other processes used while
      it ran (``machine_busy`` is set when that or the start load average is high: a loaded
      measurement).
    """
    opts = dict(variant=variant, height=height, width=width, guidance_scale=guidance_scale, sampler=sampler,
                repeats=repeats, calls=calls, threads=threads, dtype=dtype, attention_impl=attention_impl,
                warm_cache=warm_cache, cache_dir=cache_dir, seed=seed, batch=batch, steps=steps, timeout=timeout)
    opts.update(_parse_overrides(overrides, list(opts)))
    batch = 2 if opts["batch"] is None else int(opts["batch"])
    steps = 25 if opts["steps"] is None else int(opts["steps"])
    repeats, calls = int(opts["repeats"]), int(opts["calls"])
    if batch < 1 or steps < 1 or repeats < 1 or calls < 1:
        raise ValueError(f"batch ({batch}), steps ({steps}), repeats ({repeats}) and calls ({calls}) must be >= 1")
    from ldm_jax.diffusion.samplers import ALIASES, sampler_class

    sampler_class(opts["sampler"])  # unknown sampler -> ValueError before any work
    if ALIASES.get(opts["sampler"], opts["sampler"]) not in _PEER_SCHEDULERS:
        raise ValueError(f"no diffusers peer scheduler for sampler {opts['sampler']!r}")
    cpus, n_threads = _cpu_set(opts["threads"])

    load_start = list(os.getloadavg())
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
    import jax

    result: dict[str, Any] = {
        "bench": "sample", "model": label, "folder": folder, "batch": batch, "steps": steps,
        "height": height, "width": width, "latent_shape_nchw": list(latents.shape),
        "guidance_scale": float(opts["guidance_scale"]), "sampler": opts["sampler"], "repeats": repeats,
        "calls_per_round": calls, "threads": n_threads, "cpu_affinity": cpus, "cpu_count": os.cpu_count(),
        "isolation": "one process per side per round, alternating ours/peer, pinned to the same CPUs",
        "versions": _versions(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    missing = _torch_available() if peer else "disabled (--no-peer)"
    work = tempfile.mkdtemp(prefix="bench_sample_")
    # a fresh cache dir: our first process compiles cold, the later ones find its programs
    xla_cache = tempfile.mkdtemp(prefix="xla_", dir=_ensure_dir(os.path.join(opts["cache_dir"] or BENCH_CACHE, "xla")))
    lat_path = os.path.join(work, "latents.npy")
    np.save(lat_path, latents)
    base = dict(folder=folder, prompts=[PROMPT] * batch, negatives=[NEGATIVE_PROMPT] * batch, latents=lat_path,
                steps=steps, guidance_scale=result["guidance_scale"], sampler=opts["sampler"], height=height,
                width=width, dtype=opts["dtype"], attention_impl=opts["attention_impl"], cache=xla_cache,
                precision=str(jax.config.jax_default_matmul_precision or "default"), threads=n_threads, cpus=cpus)
    images = {s: os.path.join(work, f"{s}.npy") for s in ("ours", "peer")}
    rounds: list[dict] = []
    try:
        for r in range(repeats):
            entry: dict[str, Any] = {"round": r}
            for side in ("ours", "peer") if missing is None else ("ours",):
                args = dict(base, side=side, calls=calls, images_out=images[side] if r == 0 else None)
                entry[side] = _run_worker(args, n_threads, float(opts["timeout"]))
            rounds.append(entry)
        warm = [e["ours"] for e in rounds[1:]]
        if opts["warm_cache"] and not warm:
            warm = [_run_worker(dict(base, side="ours", calls=0), n_threads, float(opts["timeout"]))]
            result["warm_cache_extra_process"] = warm[0]
        ours_images = np.load(images["ours"])
        peer_images = np.load(images["peer"]) if missing is None else None
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    result["load_avg"] = {"start": load_start, "end": list(os.getloadavg())}
    result["rounds"] = rounds
    result["xla_cache_dir"] = xla_cache

    first = rounds[0]["ours"]
    t_ours = [t for e in rounds for t in e["ours"]["steady_calls_s"]]
    t_loop = [t for e in rounds for t in e["ours"]["loop_s"]]
    steady = statistics.median(t_ours)
    result["device"] = first["device"]
    result["ours"] = {
        "load_s": first["load_s"], "first_call_s": first["first_call_s"],
        "compile_cold_s": max(first["first_call_s"] - steady, 0.0),
        "cold_cache_new_entries": first["new_cache_entries"],
        "s_per_call": steady, "s_per_image": steady / batch, "steady_calls_s": t_ours,
        "best_s_per_call": min(t_ours), "loop_s": statistics.median(t_loop), "loop_calls_s": t_loop,
        "s_per_step": statistics.median(t_loop) / steps,
        "attention_impl": first["attention_impl"], "compiler_options": first["compiler_options"],
        "dtype": first["dtype"], "threads": n_threads,
    }
    if warm:
        warm_first = statistics.median(w["first_call_s"] for w in warm)
        result["ours"].update(first_call_warm_cache_s=warm_first,
                              first_calls_warm_cache_s=[w["first_call_s"] for w in warm],
                              compile_warm_cache_s=max(warm_first - steady, 0.0),
                              warm_cache_new_entries=max(w["new_cache_entries"] for w in warm))
    others = [e[s]["others_cpu_frac"] for e in rounds for s in ("ours", "peer")
              if s in e and e[s].get("others_cpu_frac") is not None]
    result["others_cpu_frac_max"] = max(others) if others else None
    busy = [f"load average {load_start[0]:.2f} at start"] if load_start[0] > 0.25 * n_threads else []
    if others and max(others) > 0.05:
        busy.append(f"other processes used up to {100 * max(others):.0f}% of the machine's CPU during a worker")
    result["machine_busy"] = "; ".join(busy) or None
    if missing is not None:
        result["peer"] = None
        result["peer_skipped"] = missing
        return result

    p0 = rounds[0]["peer"]
    t_peer = [t for e in rounds for t in e["peer"]["steady_calls_s"]]
    peer_steady = statistics.median(t_peer)
    step_s = _median(t for e in rounds for t in e["peer"]["step_s"])
    result["peer"] = {
        "name": "diffusers.StableDiffusionPipeline (PyTorch)", "scheduler": p0["scheduler"],
        "torch_threads": p0["torch_threads"], "load_s": p0["load_s"], "first_call_s": p0["first_call_s"],
        "first_calls_s": [e["peer"]["first_call_s"] for e in rounds],
        "warmup_s": max(p0["first_call_s"] - peer_steady, 0.0),  # eager: no compile, first-call warm-up only
        "s_per_call": peer_steady, "s_per_image": peer_steady / batch, "steady_calls_s": t_peer,
        "best_s_per_call": min(t_peer), "s_per_step": step_s,
    }
    result["speedup"] = result["peer"]["s_per_image"] / result["ours"]["s_per_image"]
    # Fastest steady call of each side: this machine has spells in which the same code runs up to 2x
    # slower for seconds at a time (README, "Slow spells"); the minima compare the two undisturbed.
    result["speedup_best"] = result["peer"]["best_s_per_call"] / result["ours"]["best_s_per_call"]
    result["speedup_per_round"] = [statistics.median(e["peer"]["steady_calls_s"]) /
                                   statistics.median(e["ours"]["steady_calls_s"]) for e in rounds]
    if step_s:
        result["step_speedup"] = step_s / result["ours"]["s_per_step"]
    result["images_mean_abs_diff"] = float(np.mean(np.abs(ours_images - peer_images)))
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


def _peer_train_step(config, latent_shape_nhwc, ctx_shape) -> tuple[Callable[[], None], dict]:
    """diffusers' PyTorch UNet, AdamW, MSE on eps: (one training step, what it is)."""
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

    return step, {"name": "diffusers.UNet2DConditionModel (PyTorch) AdamW step", "torch_threads": torch.get_num_threads()}


def alternate_rounds(sides: dict[str, Callable[[], None]], steps: int, rounds: int,
                     pause_s: float = 0.5) -> dict[str, list[list[float]]]:
    """Time ``steps`` calls of each side in turn, for ``rounds`` rounds, pausing ``pause_s`` before
    every side but the first (the previous side's worker threads go idle) -> per side, per round,
    seconds per call."""
    out: dict[str, list[list[float]]] = {name: [] for name in sides}
    for r in range(rounds):
        for i, (name, fn) in enumerate(sides.items()):
            if (r or i) and pause_s:
                time.sleep(pause_s)
            out[name].append([_timed(fn)[0] for _ in range(steps)])
    return out


def bench_train(config: str | None = None, overrides: Sequence[str] = (), batch: int | None = None,
                steps: int | None = None, peer: bool = True, rounds: int = 3) -> dict:
    """Diffusion train-step throughput (``ldm_jax.train.diffusion``) vs diffusers' PyTorch UNet step.

    Args:
      config: a training config file (default ``configs/tiny_train.py``); ``overrides`` apply to it.
        The data source is forced to ``synthetic_latents`` (UNet step on precomputed latents, as the peer).
      batch: global batch (default: the first stage's); steps: timed steps per side and round (default 5).
      rounds: rounds of ``steps`` of ours then ``steps`` of the peer, alternating (with a pause
        between sides), so a slow spell of the machine lands on both sides rather than on one.

    Returns: JSON-able dict: ``ours`` (``compile_s``, ``s_per_step`` (median over all rounds),
    ``images_per_s``, ``flops_per_step`` from XLA's cost analysis, ``mfu`` vs ``matmul_peak_gflops``),
    ``peer`` (PyTorch, same UNet config, AdamW, MSE on eps; its MFU uses our FLOP count), ``speedup``
    and ``speedup_per_round``.
    """
    import jax

    from ldm_jax.config_utils import load_config
    from ldm_jax.train import diffusion, sharding

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(config or os.path.join(repo, "configs", "tiny_train.py"), overrides)
    cfg.data.source = "synthetic_latents"
    steps = 5 if steps is None else int(steps)
    if steps < 1 or int(rounds) < 1:
        raise ValueError(f"steps and rounds must be >= 1, got steps={steps}, rounds={rounds}")
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
    carry = {"state": ts.state}

    def ours_step():
        carry["state"], carry["metrics"] = compiled(carry["state"], gbatch, ts.frozen)
        jax.block_until_ready(carry["metrics"])

    ours_step()
    lat = local.get("latents")
    latent_shape = tuple(lat.shape) if lat is not None else (b, stage.resolution, stage.resolution, cfg.unet.in_channels)
    missing = _torch_available() if peer else "disabled (--no-peer)"
    peer_step, peer_info = None, None
    if missing is None:
        ctx_shape = (b, int(cfg.text_encoder.get("max_position_embeddings", 77)), int(cfg.unet.cross_attention_dim))
        peer_step, peer_info = _peer_train_step(cfg, latent_shape, ctx_shape)
        peer_info["first_step_s"] = _timed(peer_step)[0]
    sides = {"ours": ours_step} if peer_step is None else {"ours": ours_step, "peer": peer_step}
    timed = alternate_rounds(sides, steps, int(rounds))
    ours_rounds, peer_rounds = timed["ours"], timed.get("peer", [])
    times = [t for r in ours_rounds for t in r]
    step_s = statistics.median(times)
    peak = matmul_peak_gflops()
    result: dict[str, Any] = {
        "bench": "train", "config": cfg.get("name", config), "batch": b, "steps": steps, "rounds": int(rounds),
        "latent_shape_nhwc": list(latent_shape), "versions": _versions(), "device": _device_info(jax.devices()),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "matmul_peak_gflops": peak,
        "ours": {"compile_s": compile_s, "s_per_step": step_s, "images_per_s": b / step_s, "step_times_s": times,
                 "flops_per_step": flops, "mfu": flops / step_s / (peak * 1e9) if flops else None,
                 "compute_dtype": cfg.train.get("compute_dtype", "float32"),
                 "compiler_options": diffusion.compiler_options(cfg, mesh.devices.flat[0].platform),
                 "loss": float(carry["metrics"]["loss"])},
    }
    if peer_step is None:
        result["peer"], result["peer_skipped"] = None, missing
        return result
    peer_times = [t for r in peer_rounds for t in r]
    p_step = statistics.median(peer_times)
    result["peer"] = dict(peer_info, s_per_step=p_step, step_times_s=peer_times, images_per_s=b / p_step,
                          mfu=flops / p_step / (peak * 1e9) if flops else None)
    result["speedup"] = p_step / step_s
    result["speedup_per_round"] = [statistics.median(p) / statistics.median(o) for o, p in zip(ours_rounds, peer_rounds)]
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
