"""Process-level settings that entry points opt into: the persistent compilation cache and CPU tuning.

The library itself (pipeline, trainers) runs with each backend's defaults. An entry point (the
``ldm-jax`` command, ``make test``, a notebook) may opt into these, and the CPU tuning only ever
applies when the backend is the CPU:

- :func:`enable_compilation_cache`: JAX's persistent compilation cache, so a second process reuses
  the first one's compiled programs.
- :func:`reexec_with_cpu_tuning`: re-executes the process under :data:`MALLOC_TUNABLES` (glibc
  malloc with transparent huge pages and a heap kept between steps). XLA:CPU re-allocates its
  activation buffers every step; with transparent huge pages in ``madvise`` mode every fresh 4 KiB
  page costs a page fault, which can take a large share of a CPU step. glibc reads the variable
  once, at start-up, hence the re-execution (``LDM_JAX_HUGEPAGE_MALLOC=0`` turns it off).
- :func:`enable_cpu_tuning`: process-wide defaults for jitted functions on the CPU: XLA:CPU hands
  matmuls and reductions to YNNPACK (:data:`CPU_YNN_FUSIONS`, see :func:`ynn_options`), and
  ``LDM_JAX_CONV_KERNEL_GRAD=taps`` selects the tap-matmul convolution kernel gradient
  (:mod:`ldm_jax.models.conv`). :func:`jit_compiler_options` gives the library's jitted functions
  these options only when tuning is enabled and their backend is the CPU.

Measurements behind the defaults are in ``docs/benchmarks.md``.
"""
from __future__ import annotations

import importlib.util
import os
import platform as _platform
import sys
from typing import Mapping, Sequence

__all__ = [
    "DEFAULT_CACHE_DIR", "MALLOC_TUNABLES", "CPU_YNN_FUSIONS", "YNN_FUSION_FLAG", "YNN_FUSION_TYPES",
    "enable_compilation_cache", "backend_name", "hugepage_malloc_env", "reexec_with_cpu_tuning",
    "enable_cpu_tuning", "cpu_tuning_enabled", "disable_cpu_tuning", "ynn_options", "jit_compiler_options",
    "main",
]

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "xla")

MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:"
                   "glibc.malloc.top_pad=67108864:glibc.malloc.trim_threshold=268435456")
_MALLOC_OPT_OUT = "LDM_JAX_HUGEPAGE_MALLOC"
_CONV_GRAD_ENV = "LDM_JAX_CONV_KERNEL_GRAD"

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_TYPES = {"dot": "LIBRARY_FUSION_TYPE_DOT", "eltwise": "LIBRARY_FUSION_TYPE_ELTWISE",
                    "reduce": "LIBRARY_FUSION_TYPE_REDUCE"}
# Matmuls and softmax reductions to YNNPACK, convolutions to XLA's own kernel: the fastest choice for
# both the sampling loop and the training step of the measured models (docs/benchmarks.md).
CPU_YNN_FUSIONS = ("dot", "reduce")

# Plugins whose presence means JAX may pick an accelerator backend.
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
_tuning: dict = {"enabled": False}


# ---------------------------------------------------------------------------------- compilation cache


def enable_compilation_cache(cache_dir: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache in ``cache_dir`` (default ``$LDM_JAX_CACHE`` or
    ``~/.cache/ldm_jax/xla``); an already configured directory is kept when ``cache_dir`` is None.
    Every compiled program is stored, however quick its compile. Returns the directory in use."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current and cache_dir is None:
        return current
    cache_dir = cache_dir or os.environ.get("LDM_JAX_CACHE", DEFAULT_CACHE_DIR)
    if "://" not in cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return cache_dir


# ---------------------------------------------------------------------------------- backend


def backend_name() -> str:
    """The platform JAX will run on: ``cpu``, ``gpu`` or ``tpu``, without starting JAX where it can.

    ``JAX_PLATFORMS`` decides when set; without an accelerator plugin installed it is the CPU;
    otherwise JAX is asked (which initialises its backends).
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        name = platforms.split(",")[0].strip()
    elif not any(_installed(m) for m in _ACCELERATOR_PLUGINS):
        name = "cpu"
    else:
        import jax

        name = jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(name, name)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------------- malloc


def _glibc_has_hugetlb_tunable(libc: tuple[str, str]) -> bool:
    name, version = libc
    if name != "glibc":
        return False
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def hugepage_malloc_env(environ: Mapping[str, str], system: str | None = None,
                        libc: tuple[str, str] | None = None) -> dict[str, str] | None:
    """``environ`` plus :data:`MALLOC_TUNABLES` in ``GLIBC_TUNABLES`` (appended to any tunables
    already there), or None when nothing should change: already set (any ``glibc.malloc.hugetlb``
    value, so a user's choice wins), opted out with ``LDM_JAX_HUGEPAGE_MALLOC=0``, not Linux, or a
    libc without the tunable (musl, glibc < 2.35)."""
    system = _platform.system() if system is None else system
    libc = _platform.libc_ver() if libc is None else libc
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get(_MALLOC_OPT_OUT, "1") == "0" or system != "Linux" or not _glibc_has_hugetlb_tunable(libc)
            or "glibc.malloc.hugetlb=" in tunables):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{MALLOC_TUNABLES}" if tunables else MALLOC_TUNABLES
    return env


def reexec_with_cpu_tuning(module: str, argv: Sequence[str], backend: str | None = None) -> None:
    """On the CPU backend, replace this process by ``python -m module *argv`` under
    :func:`hugepage_malloc_env`; return (doing nothing) on any other backend or when that is None.
    Only for a program's entry point, before any work: nothing after the call runs in this process."""
    if (backend or backend_name()) != "cpu":
        return
    env = hugepage_malloc_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


# ---------------------------------------------------------------------------------- XLA:CPU options


def ynn_options(fusions: str | Sequence[str] | None, backend: str | None = None) -> dict | None:
    """``("dot", "eltwise")`` or ``"dot,eltwise"`` -> ``{YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_DOT,..."}``
    for ``jax.jit(compiler_options=...)``; None when nothing is asked for or ``backend`` (default
    :func:`backend_name`) is not the CPU. Unknown names raise ``ValueError``."""
    if isinstance(fusions, str):
        fusions = fusions.split(",")
    names = [str(f).strip().lower() for f in (fusions or ()) if str(f).strip()]
    unknown = sorted(set(names) - set(YNN_FUSION_TYPES))
    if unknown:
        raise ValueError(f"unknown YNNPACK fusion type(s) {unknown}; expected some of {sorted(YNN_FUSION_TYPES)}")
    if not names or (backend or backend_name()) != "cpu":
        return None
    return {YNN_FUSION_FLAG: ",".join(YNN_FUSION_TYPES[k] for k in YNN_FUSION_TYPES if k in names)}


def enable_cpu_tuning(backend: str | None = None) -> bool:
    """Opt this process into the CPU tuning (see the module docstring) when ``backend`` (default
    :func:`backend_name`) is the CPU. Returns whether it is enabled."""
    if (backend or backend_name()) != "cpu":
        return False
    from ldm_jax.models import conv

    conv.set_kernel_grad_mode(os.environ.get(_CONV_GRAD_ENV, "xla"))  # ValueError names the variable
    _tuning["enabled"] = True
    return True


def disable_cpu_tuning() -> None:
    """Back to the backend's defaults (tests)."""
    from ldm_jax.models import conv

    conv.set_kernel_grad_mode("xla")
    _tuning["enabled"] = False


def cpu_tuning_enabled() -> bool:
    return _tuning["enabled"]


def jit_compiler_options(backend: str, options: Mapping | None = None) -> dict | None:
    """XLA options for a library function jitted for ``backend``: ``options`` when given (a dict,
    ``{}`` for XLA's defaults), else the CPU tuning's YNNPACK fusions when it is enabled and
    ``backend`` is the CPU, else None (the backend's defaults)."""
    if options is not None:
        return dict(options) or None
    if _tuning["enabled"] and backend == "cpu":
        return ynn_options(CPU_YNN_FUSIONS, backend)
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ldm_jax.runtime COMMAND [ARGS...]``: replace this process by ``COMMAND`` (looked up
    on ``PATH``) under :func:`hugepage_malloc_env` on the CPU backend, else under the unchanged
    environment. ``make test`` runs pytest this way."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m ldm_jax.runtime COMMAND [ARGS...]")
    env = (hugepage_malloc_env(os.environ) if backend_name() == "cpu" else None) or dict(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main()
