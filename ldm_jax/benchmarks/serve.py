"""``ldm-jax bench serve``: the HTTP server under load, with batching and served one image at a time.

Both sides answer the same stream of requests (``clients`` concurrent clients, each sending
``txt2img`` requests back to back for ``seconds``) from the same model in this process, on
loopback; the sides alternate for ``rounds`` rounds and every round is reported.
"""
from __future__ import annotations

import asyncio
import functools
import multiprocessing
import statistics
import time
from typing import Callable

__all__ = ["load", "txt2img_body", "unet_gflop_per_image", "bench_serve"]


def txt2img_body(i: int, *, steps: int, cfg_scale: float, side: int, sampler: str) -> dict:
    """Request ``i`` of a load: its own prompt and seed."""
    return {"prompt": f"a red circle number {i}", "seed": i, "steps": steps, "cfg_scale": cfg_scale,
            "width": side, "height": side, "sampler_name": sampler}


def load(url: str, body: Callable[[int], dict], *, clients: int = 32, seconds: float = 30.0,
         path: str = "/sdapi/v1/txt2img", headers: dict | None = None) -> dict:
    """``clients`` concurrent clients POST ``body(i)`` (request ``i``) back to back for ``seconds``.

    Returns the status counts, the latency percentiles of answered requests (seconds), images/s (of the
    200s, over the wall time) and the requests sent."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    images = [0]
    counter = [0]
    errors: list[dict] = []

    async def client(session, stop_at):
        while time.monotonic() < stop_at:
            i = counter[0]
            counter[0] += 1
            t = time.monotonic()
            try:
                async with session.post(url + path, json=body(i), headers=headers) as r:
                    data = await r.json(content_type=None)
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status == 200:
                        latencies.append(time.monotonic() - t)
                        images[0] += len(data["images"])
                    elif r.status == 429:
                        await asyncio.sleep(float(r.headers.get("Retry-After", "1")) / 10)
                    elif len(errors) < 5:
                        errors.append({"request": i, "status": r.status, "detail": str(data.get("detail"))[:300]})
            except aiohttp.ClientError as e:
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1

    async def run():
        timeout = aiohttp.ClientTimeout(total=max(120.0, 4 * seconds))
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as s:
            start = time.monotonic()
            await asyncio.gather(*(client(s, start + seconds) for _ in range(clients)))
            return time.monotonic() - start

    wall = asyncio.run(run())
    lat = sorted(latencies)

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    return {"requests": counter[0], "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "images": images[0], "wall_s": wall, "images_per_s": images[0] / wall, "p50_s": pct(0.5),
            "p99_s": pct(0.99), "mean_s": statistics.fmean(lat) if lat else None, "errors": errors}


def unet_gflop_per_image(pipe, side: int, steps: int, guided: bool) -> float:
    """The UNet's GFLOP for one image of ``steps`` steps (XLA's cost analysis of one forward; two rows per
    step when guided), for samplers that evaluate the UNet once per step."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.benchmarks.common import cost_flops

    rows = 2 if guided else 1
    lat = side // pipe.vae_scale
    x = jnp.zeros((rows, lat, lat, int(pipe.config.unet["in_channels"])), pipe.unet.dtype)
    context = jnp.zeros((rows,) + pipe.encode_prompt([""]).shape[1:], pipe.unet.dtype)
    forward = jax.jit(lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c))
    compiled = forward.lower(pipe.params["unet"], x, jnp.zeros((rows,), jnp.int32), context).compile()
    return (cost_flops(compiled) or float("nan")) * steps / 1e9


def bench_serve(config: str | None = None, overrides=(), batch: int | None = None, steps: int | None = None,
                peer: bool = True, clients: int = 32, seconds: float = 30.0, rounds: int = 2,
                buckets: tuple = (1, 2, 4, 8), size: int | None = None, sampler: str = "DPM++ 2M",
                cfg_scale: float = 7.0, max_wait_ms: float = 20.0) -> dict:
    """Images/s and latency of ``ldm-jax serve`` with batching (``buckets``) and one image per call.

    Args:
      config: a model (diffusers folder, workdir, ...); default the tiny reference SD v1 folder, written
        once under the bench cache.
      overrides: ``--config.KEY=VALUE`` for any other keyword argument.
      batch: the largest bucket (buckets up to it, powers of two); steps: denoising steps (default 20);
      peer: also serve one image per call (the comparison; the peer of this benchmark).
    """
    import os

    from ldm_jax.benchmarks.common import BENCH_CACHE, matmul_peak_gflops, parse_overrides, versions
    from ldm_jax.pipeline import load_pipeline
    from ldm_jax.serve.app import BackgroundServer, Server, ServeConfig

    kw = parse_overrides(overrides, ("clients", "seconds", "rounds", "size", "sampler", "cfg_scale",
                                     "max_wait_ms"))
    clients, seconds, rounds = int(kw.get("clients", clients)), float(kw.get("seconds", seconds)), int(kw.get("rounds", rounds))
    size, sampler = kw.get("size", size), str(kw.get("sampler", sampler))
    cfg_scale, max_wait_ms = float(kw.get("cfg_scale", cfg_scale)), float(kw.get("max_wait_ms", max_wait_ms))
    if batch:
        buckets = tuple(b for b in (1, 2, 4, 8, 16, 32, 64) if b <= batch)
    steps = int(steps or 20)
    model = config
    if model is None:
        from ldm_jax.reference import write_reference_folder

        model = os.path.join(BENCH_CACHE, "serve_v1")
        if not os.path.isdir(model):
            write_reference_folder(model, "v1")
    pipe = load_pipeline(model)
    side = int(size or int(pipe.config.unet["sample_size"]) * pipe.vae_scale)
    warm = (f"{side}x{side}:{steps}:{sampler}",)

    body = functools.partial(txt2img_body, steps=steps, cfg_scale=cfg_scale, side=side, sampler=sampler)
    spawn = multiprocessing.get_context("spawn")  # the clients in their own process: no GIL shared with the server

    sides = {"batched": ServeConfig(buckets=tuple(buckets), max_wait_ms=max_wait_ms, max_queue=4 * clients,
                                    warmup=warm),
             "one_at_a_time": ServeConfig(buckets=(1,), max_wait_ms=0.0, max_queue=4 * clients, warmup=warm)}
    names = ["batched", "one_at_a_time"] if peer else ["batched"]
    results: dict = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            server = Server(pipe, sides[name], model_name=model)
            server.warm_up()
            compiles = server.compiles
            with BackgroundServer(server) as url, spawn.Pool(1) as pool:
                out = pool.apply(load, (url, body), dict(clients=clients, seconds=seconds))
            server.close()
            out["compiles_during_load"] = server.compiles - compiles
            results[name].append(out)
    summary = {name: {"images_per_s": statistics.median(r["images_per_s"] for r in rs),
                      "p50_s": statistics.median(r["p50_s"] for r in rs if r["p50_s"] is not None),
                      "p99_s": statistics.median(r["p99_s"] for r in rs if r["p99_s"] is not None)}
               for name, rs in results.items()}
    out = {"benchmark": "serve", "model": model, "size": side, "steps": steps, "sampler": sampler,
           "cfg_scale": cfg_scale, "clients": clients, "seconds": seconds, "buckets": list(buckets),
           "max_wait_ms": max_wait_ms, "rounds": results, "summary": summary, "versions": versions()}
    # What the CPU allows: each side's UNet FLOP rate against the machine's matmul peak. Batching can gain at
    # most peak / (the one-at-a-time rate), reached only if batched convolutions ran as fast as a big matmul.
    gflop = unet_gflop_per_image(pipe, side, steps, cfg_scale > 1)
    peak = matmul_peak_gflops()
    for name in names:
        summary[name]["unet_gflop_per_s"] = gflop * summary[name]["images_per_s"]
    out["ceiling"] = {"unet_gflop_per_image": gflop, "matmul_peak_gflop_per_s": peak}
    if peer:
        out["batched_vs_one_at_a_time"] = summary["batched"]["images_per_s"] / summary["one_at_a_time"]["images_per_s"]
        out["ceiling"]["max_ratio_at_matmul_peak"] = peak / summary["one_at_a_time"]["unet_gflop_per_s"]
    return out
