"""Process-level settings entry points opt into (:mod:`ldm_jax.runtime`): the CPU malloc settings and
their re-exec, the YNNPACK options and the CPU tuning, the backend guard (nothing of it off the CPU)."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ldm_jax import cli, runtime
from ldm_jax.runtime import MALLOC_TUNABLES, hugepage_malloc_env

GLIBC = ("glibc", "2.36")


# ---------------------------------------------------------------------------------------- malloc


def test_adds_the_tunable():
    env = hugepage_malloc_env({"PATH": "/bin"}, "Linux", GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": MALLOC_TUNABLES}


def test_appends_to_existing_tunables():
    env = hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "Linux", GLIBC)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + MALLOC_TUNABLES


@pytest.mark.parametrize("environ, system, libc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "Linux", GLIBC),  # already set: no loop
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "Linux", GLIBC),  # the user's own choice wins
    ({"LDM_JAX_HUGEPAGE_MALLOC": "0"}, "Linux", GLIBC),  # opted out
    ({}, "Darwin", ("", "")),
    ({}, "Linux", ("glibc", "2.31")),  # no hugetlb tunable before glibc 2.35
    ({}, "Linux", ("", "")),  # musl
])
def test_leaves_the_environment_alone(environ, system, libc):
    assert hugepage_malloc_env(environ, system, libc) is None


def test_reexec_replaces_the_process_on_the_cpu(tmp_path):
    """The re-executed process runs ``python -m module argv`` with the tunable; the caller's code
    after the call never runs. On another backend nothing happens."""
    (tmp_path / "show_env.py").write_text(textwrap.dedent("""
        import json, os, sys
        print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:]}))
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LDM_JAX_HUGEPAGE_MALLOC")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])

    def run(backend):
        code = (f"from ldm_jax.runtime import reexec_with_cpu_tuning as r; "
                f"r('show_env', ['a', 'b c'], {backend!r}); print('NOT REPLACED')")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    if hugepage_malloc_env(env) is None:  # not glibc >= 2.35 on Linux: nothing to do, the caller goes on
        assert run("cpu") == "NOT REPLACED"
    else:
        assert json.loads(run("cpu")) == {"tunables": MALLOC_TUNABLES, "argv": ["a", "b c"]}
    assert run("tpu") == "NOT REPLACED" and run("gpu") == "NOT REPLACED"


class _Replaced(Exception):
    pass


def _entry_point(monkeypatch, backend, malloc_opt_out=False):
    """Run ``cli.run()`` as the ``ldm-jax`` command would on ``backend``; returns the execve calls and
    what main saw (CPU tuning on, compilation cache enabled) if it ran."""
    calls, seen = [], {}

    def fake_execve(path, args, env):
        calls.append((path, args, env.get("GLIBC_TUNABLES")))
        raise _Replaced

    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setattr(runtime, "backend_name", lambda: backend)
    monkeypatch.setattr(runtime, "enable_compilation_cache", lambda *a: seen.setdefault("cache_enabled", True))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    if malloc_opt_out:
        monkeypatch.setenv("LDM_JAX_HUGEPAGE_MALLOC", "0")
    else:
        monkeypatch.delenv("LDM_JAX_HUGEPAGE_MALLOC", raising=False)
    monkeypatch.setattr(sys, "argv", ["ldm-jax", "demo", "--out", "x"])
    monkeypatch.setattr(cli, "main", lambda argv=None: seen.update(main=True, tuning=runtime.cpu_tuning_enabled()) or 0)
    try:
        with pytest.raises((_Replaced, SystemExit)):
            cli.run()
    finally:
        runtime.disable_cpu_tuning()
    return calls, seen


def test_console_entry_point_reexecs_on_the_cpu_before_any_work(monkeypatch):
    """``ldm-jax`` (cli.run) on the CPU re-executes itself as ``python -m ldm_jax.cli`` with its arguments."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LDM_JAX_HUGEPAGE_MALLOC")}
    if hugepage_malloc_env(clean) is None:
        pytest.skip("no glibc >= 2.35 here: the entry point runs main directly")
    calls, seen = _entry_point(monkeypatch, "cpu")
    assert calls == [(sys.executable, [sys.executable, "-m", "ldm_jax.cli", "demo", "--out", "x"], MALLOC_TUNABLES)]
    assert seen == {}  # main did not run in the replaced process


def test_entry_point_enables_the_cpu_tuning_on_the_cpu(monkeypatch):
    """Where it runs main (the re-executed process, or malloc settings opted out) the CPU tuning is on."""
    calls, seen = _entry_point(monkeypatch, "cpu", malloc_opt_out=True)
    assert calls == [] and seen == {"main": True, "tuning": True, "cache_enabled": True}


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_non_cpu_backend_gets_no_cpu_tuning(monkeypatch, backend):
    """On a TPU or GPU the entry point neither re-executes nor enables any CPU option, and the
    library's jitted functions keep the backend's defaults."""
    calls, seen = _entry_point(monkeypatch, backend)
    assert calls == []  # not re-executed
    assert seen == {"main": True, "tuning": False, "cache_enabled": True}
    assert runtime.jit_compiler_options(backend) is None
    assert runtime.ynn_options(runtime.CPU_YNN_FUSIONS, backend) is None
    assert runtime.enable_cpu_tuning(backend) is False and not runtime.cpu_tuning_enabled()


def test_runner_execs_a_command_under_the_tunables():
    """``python -m ldm_jax.runtime CMD...`` runs CMD with the tunables (what ``make test`` does),
    and leaves a user's own ``glibc.malloc.hugetlb`` choice alone."""
    show = [sys.executable, "-c", "import os, sys; print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])", "a", "b c"]
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LDM_JAX_HUGEPAGE_MALLOC")}
    run = lambda e: subprocess.run([sys.executable, "-m", "ldm_jax.runtime", *show], env=e,  # noqa: E731
                                   capture_output=True, text=True, timeout=120)
    out = run(env)
    assert out.returncode == 0, out.stderr
    expected = MALLOC_TUNABLES if hugepage_malloc_env(env) is not None else None
    assert out.stdout.strip() == f"{expected} ['a', 'b c']"
    out = run({**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert out.stdout.strip() == "glibc.malloc.hugetlb=0 ['a', 'b c']"
    out = run({**env, "JAX_PLATFORMS": "tpu"})  # another backend: the command runs untouched
    assert out.stdout.strip() == "None ['a', 'b c']"
    assert subprocess.run([sys.executable, "-m", "ldm_jax.runtime"], env=env, capture_output=True,
                          timeout=120).returncode != 0  # no command: a usage error


def test_make_test_runs_pytest_through_the_runner():
    """``make test`` (pytest is no ``ldm-jax`` re-exec) goes through that runner: one implementation
    of the tunables, no copy of the string in the Makefile."""
    makefile = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Makefile")).read()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "$(PY) -m ldm_jax.runtime $(PY) -m pytest" in recipe
    assert "glibc.malloc" not in makefile


def test_backend_name_reads_jax_platforms_first(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert runtime.backend_name() == "gpu"
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert runtime.backend_name() == "tpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert runtime.backend_name() == "cpu"


# ---------------------------------------------------------------------------------------- XLA:CPU options


def test_names_map_to_xla_fusion_types():
    opts = runtime.ynn_options(("reduce", "dot"), backend="cpu")
    assert opts == {runtime.YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    assert runtime.ynn_options("dot, eltwise", backend="cpu") == {
        runtime.YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}


@pytest.mark.parametrize("fusions", [None, (), "", ["  "]])
def test_nothing_asked_gives_no_options(fusions):
    assert runtime.ynn_options(fusions, backend="cpu") is None


def test_other_backends_get_no_options():
    assert runtime.ynn_options(("dot",), backend="gpu") is None
    assert runtime.ynn_options(("dot",), backend="tpu") is None


def test_unknown_fusion_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown YNNPACK fusion"):
        runtime.ynn_options(("dot", "conv3d"), backend="cpu")


def test_library_defaults_are_the_backends_and_tuning_is_opt_in():
    """Without the opt-in a jitted library function gets no options; with it, the CPU gets the
    YNNPACK fusions (other backends still nothing); an explicit dict wins either way."""
    from ldm_jax.config_utils import load_config
    from ldm_jax.models import conv
    from ldm_jax.train import loop

    c = load_config("tiny_train")
    assert c.train.compiler_options is None and not runtime.cpu_tuning_enabled()
    assert loop.compiler_options(c, "cpu") is None and runtime.jit_compiler_options("cpu") is None
    try:
        assert runtime.enable_cpu_tuning("cpu")
        ynn = runtime.ynn_options(runtime.CPU_YNN_FUSIONS, "cpu")
        assert ynn and loop.compiler_options(c, "cpu") == ynn == runtime.jit_compiler_options("cpu")
        assert loop.compiler_options(c, "tpu") is None and loop.compiler_options(c, "gpu") is None
        c.train.compiler_options = {"xla_backend_optimization_level": 0}
        assert loop.compiler_options(c, "cpu") == {"xla_backend_optimization_level": 0}
        assert runtime.jit_compiler_options("cpu", {}) is None  # {}: XLA's defaults
        assert conv.kernel_grad_mode() == "xla"
    finally:
        runtime.disable_cpu_tuning()
    assert not runtime.cpu_tuning_enabled()


def test_cpu_tuning_reads_the_conv_kernel_gradient_choice(monkeypatch):
    from ldm_jax.models import conv

    monkeypatch.setenv("LDM_JAX_CONV_KERNEL_GRAD", "taps")
    try:
        runtime.enable_cpu_tuning("cpu")
        assert conv.kernel_grad_mode() == "taps"
    finally:
        runtime.disable_cpu_tuning()
    assert conv.kernel_grad_mode() == "xla"
    monkeypatch.setenv("LDM_JAX_CONV_KERNEL_GRAD", "nope")
    with pytest.raises(ValueError, match="taps"):
        runtime.enable_cpu_tuning("cpu")
    runtime.disable_cpu_tuning()


def test_ynn_compiled_conv_and_gradients_match_xla():
    """The options reach XLA (the compiled HLO holds a YNN fusion) and change no values."""
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 8))
    w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16)) * 0.1

    def f(x, w):
        y = jax.nn.silu(lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return jnp.sum(y ** 2), y

    def run(opts):
        fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True), compiler_options=opts)
        return fn, fn(x, w)

    opts = runtime.ynn_options(tuple(runtime.YNN_FUSION_TYPES), "cpu")
    fn, ours = run(opts)
    _, ref = run(None)
    assert "ynn_fusion" in fn.lower(x, w).compile().as_text()
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
