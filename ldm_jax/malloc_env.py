"""glibc malloc settings for CPU runs: process settings that have to exist before Python starts.

On Linux with transparent huge pages in ``madvise`` mode (the common default), XLA:CPU's freed and
re-allocated activation buffers come back as fresh 4 KiB pages, and every step pays a page fault
per page. :data:`MALLOC_TUNABLES` (glibc >= 2.35) asks for transparent huge pages
(``glibc.malloc.hugetlb=1``) and keeps freed memory in the process instead of handing it back to
the kernel between steps: blocks up to 32 MiB come from the heap rather than from a fresh ``mmap``
each (``mmap_threshold``), and the heap keeps 64 MiB of slack and is trimmed only past 256 MiB
free (``top_pad``, ``trim_threshold``). Measured on the 2-core development machine:

- ``hugetlb=1`` alone: the demo's autoencoder step (16-32 channels at 32x32, batch 16) went from
  1.44 million minor faults in 30 steps (40% of its CPU time in the kernel) to 12.9 thousand, 153
  -> 100 ms per step; the demo's UNet step 177 -> 136 ms.
- But it left steps bimodal from one process to the next, depending on where the buffers landed:
  the sampling benchmark's call took 1.7 s in some processes and 2.75 s in others, 1024-token
  self-attention 15-17 or 35-38 ms. With the heap settings: 1.66-1.74 s in 9 of 9 processes.

Numerics are unchanged. glibc reads the variable once, at start-up, so the ``ldm-jax`` command
re-executes itself with it (:func:`reexec_with_hugepage_malloc`), and ``make test`` runs pytest
through ``python -m ldm_jax.malloc_env COMMAND...`` (:func:`main`), which execs any command with it.
Python API users on CPU set it themselves: ``export GLIBC_TUNABLES=<MALLOC_TUNABLES>``.
``LDM_JAX_HUGEPAGE_MALLOC=0`` turns the re-execution off.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Sequence

__all__ = ["MALLOC_TUNABLES", "hugepage_malloc_env", "main", "reexec_with_hugepage_malloc"]

MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:"
                   "glibc.malloc.top_pad=67108864:glibc.malloc.trim_threshold=268435456")
_OPT_OUT = "LDM_JAX_HUGEPAGE_MALLOC"


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
    system = platform.system() if system is None else system
    libc = platform.libc_ver() if libc is None else libc
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get(_OPT_OUT, "1") == "0" or system != "Linux" or not _glibc_has_hugetlb_tunable(libc)
            or "glibc.malloc.hugetlb=" in tunables):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{MALLOC_TUNABLES}" if tunables else MALLOC_TUNABLES
    return env


def reexec_with_hugepage_malloc(module: str, argv: Sequence[str]) -> None:
    """Replace this process by ``python -m module *argv`` under :func:`hugepage_malloc_env`, or
    return when that is None. Only for a program's entry point, before any work: nothing after
    the call runs in this process."""
    env = hugepage_malloc_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ldm_jax.malloc_env COMMAND [ARGS...]``: replace this process by ``COMMAND`` (looked
    up on ``PATH``) under :func:`hugepage_malloc_env`, or under the unchanged environment where that
    is None. ``make test`` runs pytest this way."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m ldm_jax.malloc_env COMMAND [ARGS...]")
    env = hugepage_malloc_env(os.environ) or dict(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main()
