"""``ldm-jax bench sample``: text-to-image sampling, ours against diffusers' PyTorch pipeline.

Both run on the same random SD-shaped model folder (same initial latents, prompts, steps, guidance,
sampler), each side in its own process, alternating for several rounds, both pinned to the same
CPUs and thread count, so the ``speedup`` is a ratio measured on one machine in one run; the JSON
records the load average and the CPU share other processes took meanwhile, so a measurement on a
busy machine shows as such. torch/diffusers are bench-only dependencies: imported lazily; when
missing the peer is skipped and the JSON says why.

CLI overrides (``--config.KEY=VALUE``) set keyword arguments of :func:`bench_sample`, e.g.
``ldm-jax bench sample --config.variant=v1 --config.sampler=euler --config.repeats=5``.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from ldm_jax.benchmarks.common import (BENCH_CACHE, busy_jiffies, children_cpu_s, cpu_set, device_info, ensure_dir,
                                       median, parse_overrides, timed, torch_available, versions)

__all__ = ["bench_sample"]

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
        if torch_available() is not None:
            raise RuntimeError(f"writing the reference model folder needs torch and diffusers ({torch_available()})")
        write_reference_folder(folder, variant)
    return folder, variant


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

        a, pipe = self.args, self.pipe
        inputs = pipe.prepare_txt2img(a["prompts"], a["negatives"], height=a["height"], width=a["width"],
                                      num_inference_steps=a["steps"], guidance_scale=a["guidance_scale"],
                                      sampler=a["sampler"], latents=self.latents)
        run = lambda: jax.block_until_ready(pipe.denoise(inputs))  # noqa: E731
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

        from ldm_jax import runtime

        if args["cpu_tuning"]:  # as the process that started the benchmark
            runtime.enable_cpu_tuning()
        jax.config.update("jax_default_matmul_precision", args["precision"])
        jax.config.update("jax_compilation_cache_dir", args["cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        before = len(os.listdir(args["cache"]))
        run = _Ours(dtype=args["dtype"], attention_impl=args["attention_impl"], **common)
        first, images = timed(run.call)
        out.update(new_cache_entries=len(os.listdir(args["cache"])) - before, device=device_info(run.devices),
                   attention_impl=run.pipe.unet.attention_impl, dtype=run.args["dtype"],
                   compiler_options=run.pipe.compiler_options)
        steady = [timed(run.call)[0] for _ in range(args["calls"])]
        loop = run.loop_fn() if args["calls"] else None
        out["loop_s"] = [timed(loop)[0] for _ in range(args["calls"])]
    else:
        run = _Peer(threads=args["threads"], **common)
        first, images = timed(run.call)
        steady, step_s = [], []
        for _ in range(args["calls"]):
            steady.append(timed(run.call)[0])
            step_s.append(run.last_step_s())
        out.update(scheduler=run.scheduler, torch_threads=run.torch.get_num_threads(), step_s=step_s)
    out.update(load_s=run.load_s, first_call_s=first, steady_calls_s=steady)
    if args.get("images_out"):
        np.save(args["images_out"], np.asarray(images, np.float32))
    return out


# Pins the process before anything starts a thread (numpy's BLAS, XLA, torch): threads inherit the mask.
_WORKER_CODE = ("import json, os, sys; a = json.loads(sys.argv[1]); "
                "a.get('cpus') and hasattr(os, 'sched_setaffinity') and os.sched_setaffinity(0, a['cpus']); "
                "from ldm_jax.benchmarks.sample import _worker_main; _worker_main()")


def _worker_main() -> None:
    """Entry point of a worker process (:data:`_WORKER_CODE`) -> one ``BENCH_RESULT {json}`` line."""
    args = json.loads(sys.argv[1])
    print("BENCH_RESULT " + json.dumps(_sample_worker(args)), flush=True)


def _run_worker(args: dict, threads: int, timeout: float) -> dict:
    """Run :func:`_sample_worker` in a fresh interpreter; its result plus what the machine did meanwhile."""
    env = dict(os.environ)
    import ldm_jax

    root = os.path.dirname(os.path.dirname(os.path.abspath(ldm_jax.__file__)))  # this copy of the package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    load_before = list(os.getloadavg())
    busy0, cpu0, t0 = busy_jiffies(), children_cpu_s(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WORKER_CODE, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
    busy1 = busy_jiffies()
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
    opts.update(parse_overrides(overrides, list(opts)))
    opts["batch"] = 2 if opts["batch"] is None else int(opts["batch"])
    opts["steps"] = 25 if opts["steps"] is None else int(opts["steps"])
    _check_options(opts)
    cpus, n_threads = cpu_set(opts["threads"])
    load_start = list(os.getloadavg())
    folder, label = _resolve_model(config, opts["variant"], opts["cache_dir"])
    height, width, latents = _initial_latents(folder, opts)
    result: dict[str, Any] = {
        "bench": "sample", "model": label, "folder": folder, "batch": opts["batch"], "steps": opts["steps"],
        "height": height, "width": width, "latent_shape_nchw": list(latents.shape),
        "guidance_scale": float(opts["guidance_scale"]), "sampler": opts["sampler"], "repeats": int(opts["repeats"]),
        "calls_per_round": int(opts["calls"]), "threads": n_threads, "cpu_affinity": cpus, "cpu_count": os.cpu_count(),
        "isolation": "one process per side per round, alternating ours/peer, pinned to the same CPUs",
        "versions": versions(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    missing = torch_available() if peer else "disabled (--no-peer)"
    rounds, warm, images = _run_rounds(folder, latents, height, width, opts, cpus, n_threads, missing is None)
    result["load_avg"] = {"start": load_start, "end": list(os.getloadavg())}
    result["rounds"] = rounds
    result["xla_cache_dir"] = rounds[0]["xla_cache_dir"]
    if "extra" in warm:
        result["warm_cache_extra_process"] = warm["extra"]
    result["device"] = rounds[0]["ours"]["device"]
    result["ours"] = dict(_summarize_ours(rounds, warm["runs"], opts), threads=n_threads)
    result.update(_machine_load(rounds, load_start, n_threads))
    if missing is not None:
        result["peer"] = None
        result["peer_skipped"] = missing
        return result
    result.update(_compare_with_peer(rounds, result["ours"], opts))
    result["images_mean_abs_diff"] = float(np.mean(np.abs(images["ours"] - images["peer"])))
    return result


def _check_options(opts: dict) -> None:
    """Bad options fail before any work."""
    from ldm_jax.diffusion.samplers import ALIASES, sampler_class

    if min(opts["batch"], opts["steps"], int(opts["repeats"]), int(opts["calls"])) < 1:
        raise ValueError(f"batch ({opts['batch']}), steps ({opts['steps']}), repeats ({opts['repeats']}) and calls "
                         f"({opts['calls']}) must be >= 1")
    sampler_class(opts["sampler"])  # unknown sampler -> ValueError listing the valid ones
    if ALIASES.get(opts["sampler"], opts["sampler"]) not in _PEER_SCHEDULERS:
        raise ValueError(f"no diffusers peer scheduler for sampler {opts['sampler']!r}")


def _initial_latents(folder: str, opts: dict) -> tuple[int, int, np.ndarray]:
    """Image size (the model's default unless given) and the shared initial latents (NCHW, seeded)."""
    with open(os.path.join(folder, "unet", "config.json")) as f:
        unet_cfg = json.load(f)
    with open(os.path.join(folder, "vae", "config.json")) as f:
        vae_cfg = json.load(f)
    vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    height = int(opts["height"] or unet_cfg["sample_size"] * vae_scale)
    width = int(opts["width"] or unet_cfg["sample_size"] * vae_scale)
    latents = np.random.default_rng(opts["seed"]).standard_normal(
        (opts["batch"], vae_cfg.get("latent_channels", 4), height // vae_scale, width // vae_scale)).astype(np.float32)
    return height, width, latents


def _run_rounds(folder, latents, height, width, opts, cpus, n_threads, with_peer):
    """Alternating worker processes, ours then the peer, ``repeats`` times; -> (rounds, warm-cache ours
    runs, first-round images per side)."""
    import jax

    from ldm_jax import runtime

    work = tempfile.mkdtemp(prefix="bench_sample_")
    # a fresh cache dir: our first process compiles cold, the later ones find its programs
    xla_cache = tempfile.mkdtemp(prefix="xla_", dir=ensure_dir(os.path.join(opts["cache_dir"] or BENCH_CACHE, "xla")))
    lat_path = os.path.join(work, "latents.npy")
    np.save(lat_path, latents)
    batch = opts["batch"]
    base = dict(folder=folder, prompts=[PROMPT] * batch, negatives=[NEGATIVE_PROMPT] * batch, latents=lat_path,
                steps=opts["steps"], guidance_scale=float(opts["guidance_scale"]), sampler=opts["sampler"],
                height=height, width=width, dtype=opts["dtype"], attention_impl=opts["attention_impl"],
                cache=xla_cache, precision=str(jax.config.jax_default_matmul_precision or "default"),
                threads=n_threads, cpus=cpus, cpu_tuning=runtime.cpu_tuning_enabled())
    paths = {s: os.path.join(work, f"{s}.npy") for s in ("ours", "peer")}
    timeout = float(opts["timeout"])
    rounds: list[dict] = []
    try:
        for r in range(int(opts["repeats"])):
            entry: dict[str, Any] = {"round": r, "xla_cache_dir": xla_cache}
            for side in ("ours", "peer") if with_peer else ("ours",):
                args = dict(base, side=side, calls=int(opts["calls"]), images_out=paths[side] if r == 0 else None)
                entry[side] = _run_worker(args, n_threads, timeout)
            rounds.append(entry)
        warm = {"runs": [e["ours"] for e in rounds[1:]]}
        if opts["warm_cache"] and not warm["runs"]:
            warm["extra"] = _run_worker(dict(base, side="ours", calls=0), n_threads, timeout)
            warm["runs"] = [warm["extra"]]
        images = {s: np.load(paths[s]) for s in ("ours", "peer") if s == "ours" or with_peer}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rounds, warm, images


def _summarize_ours(rounds: list[dict], warm: list[dict], opts: dict) -> dict:
    first = rounds[0]["ours"]
    t_ours = [t for e in rounds for t in e["ours"]["steady_calls_s"]]
    t_loop = [t for e in rounds for t in e["ours"]["loop_s"]]
    steady = statistics.median(t_ours)
    ours = {
        "load_s": first["load_s"], "first_call_s": first["first_call_s"],
        "compile_cold_s": max(first["first_call_s"] - steady, 0.0),
        "cold_cache_new_entries": first["new_cache_entries"],
        "s_per_call": steady, "s_per_image": steady / opts["batch"], "steady_calls_s": t_ours,
        "best_s_per_call": min(t_ours), "loop_s": statistics.median(t_loop), "loop_calls_s": t_loop,
        "s_per_step": statistics.median(t_loop) / opts["steps"],
        "attention_impl": first["attention_impl"], "compiler_options": first["compiler_options"],
        "dtype": first["dtype"],
    }
    if warm:
        warm_first = statistics.median(w["first_call_s"] for w in warm)
        ours.update(first_call_warm_cache_s=warm_first, first_calls_warm_cache_s=[w["first_call_s"] for w in warm],
                    compile_warm_cache_s=max(warm_first - steady, 0.0),
                    warm_cache_new_entries=max(w["new_cache_entries"] for w in warm))
    return ours


def _machine_load(rounds: list[dict], load_start: list[float], n_threads: int) -> dict:
    """The largest CPU share other processes took during a worker, and whether the machine was busy."""
    others = [e[s]["others_cpu_frac"] for e in rounds for s in ("ours", "peer")
              if s in e and e[s].get("others_cpu_frac") is not None]
    busy = [f"load average {load_start[0]:.2f} at start"] if load_start[0] > 0.25 * n_threads else []
    if others and max(others) > 0.05:
        busy.append(f"other processes used up to {100 * max(others):.0f}% of the machine's CPU during a worker")
    return {"others_cpu_frac_max": max(others) if others else None, "machine_busy": "; ".join(busy) or None}


def _compare_with_peer(rounds: list[dict], ours: dict, opts: dict) -> dict:
    p0 = rounds[0]["peer"]
    t_peer = [t for e in rounds for t in e["peer"]["steady_calls_s"]]
    peer_steady = statistics.median(t_peer)
    step_s = median(t for e in rounds for t in e["peer"]["step_s"])
    peer = {
        "name": "diffusers.StableDiffusionPipeline (PyTorch)", "scheduler": p0["scheduler"],
        "torch_threads": p0["torch_threads"], "load_s": p0["load_s"], "first_call_s": p0["first_call_s"],
        "first_calls_s": [e["peer"]["first_call_s"] for e in rounds],
        "warmup_s": max(p0["first_call_s"] - peer_steady, 0.0),  # eager: no compile, first-call warm-up only
        "s_per_call": peer_steady, "s_per_image": peer_steady / opts["batch"], "steady_calls_s": t_peer,
        "best_s_per_call": min(t_peer), "s_per_step": step_s,
    }
    out = {"peer": peer, "speedup": peer["s_per_image"] / ours["s_per_image"],
           # the fastest steady calls of each side: robust to spells in which the machine runs the same
           # code much slower for seconds at a time (docs/benchmarks.md)
           "speedup_best": peer["best_s_per_call"] / ours["best_s_per_call"],
           "speedup_per_round": [statistics.median(e["peer"]["steady_calls_s"]) /
                                 statistics.median(e["ours"]["steady_calls_s"]) for e in rounds]}
    if step_s:
        out["step_speedup"] = step_s / ours["s_per_step"]
    return out
