"""What the benchmarks share: options, versions, CPU pinning, machine load, timing helpers.

Speed is reported as a ratio against a peer (diffusers' PyTorch) measured in the same run; the
machine's load and the CPUs each side used are recorded with it.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence

import numpy as np

__all__ = ["BENCH_CACHE", "parse_overrides", "versions", "device_info", "torch_available", "cpu_set", "busy_jiffies",
           "children_cpu_s", "timed", "median", "ensure_dir", "matmul_peak_gflops", "cost_flops", "alternate_rounds"]

BENCH_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "bench")


def parse_overrides(overrides: Sequence[str], allowed: Sequence[str]) -> dict:
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


def versions() -> dict:
    import jax

    v = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
    for mod in ("jaxlib", "flax", "optax", "torch", "diffusers", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is reported, not raised
            v[mod] = None
    return v


def device_info(devices) -> dict:
    import jax

    d = devices[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "num_devices_total": jax.device_count(),
            "num_devices_used": len(devices), "cpu_count": os.cpu_count()}


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def torch_available() -> str | None:
    """None when torch and diffusers import, else the reason they do not."""
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def cpu_set(threads: int | None) -> tuple[list[int], int]:
    """The CPUs both sides are pinned to (the first ``threads`` of ours) and their count."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no pinning, thread counts only
        allowed = list(range(os.cpu_count() or 1))
    n = len(allowed) if threads is None else int(threads)
    if not 1 <= n <= len(allowed):
        raise ValueError(f"threads={threads}: this process may use {len(allowed)} CPU(s)")
    return allowed[:n], n


def busy_jiffies() -> int | None:
    """CPU time (clock ticks) all processes of the machine spent so far, from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait
        return sum(int(v) for i, v in enumerate(fields[1:9]) if i not in (3, 4))
    except (OSError, ValueError, IndexError):
        return None


def children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 ``n x n x n`` matmul throughput of the default JAX device, GFLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
    jax.block_until_ready(f(a, b))
    t, _ = median_time(lambda: jax.block_until_ready(f(a, b)), repeats)
    return 2 * n ** 3 / t / 1e9


def cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


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
            out[name].append([timed(fn)[0] for _ in range(steps)])
    return out
