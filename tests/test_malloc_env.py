"""glibc's huge-page malloc for CPU runs: when the environment gets the tunable, and the re-exec."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from ldm_jax import cli
from ldm_jax.malloc_env import MALLOC_TUNABLES, hugepage_malloc_env

GLIBC = ("glibc", "2.36")


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


def test_reexec_replaces_the_process(tmp_path):
    """The re-executed process runs ``python -m module argv`` with the tunable; the caller's code
    after the call never runs."""
    (tmp_path / "show_env.py").write_text(textwrap.dedent("""
        import json, os, sys
        print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:]}))
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LDM_JAX_HUGEPAGE_MALLOC")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    code = ("from ldm_jax.malloc_env import reexec_with_hugepage_malloc as r; "
            "r('show_env', ['a', 'b c']); print('NOT REPLACED')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if hugepage_malloc_env(env) is None:  # not glibc >= 2.35 on Linux: nothing to do, the caller goes on
        assert out.stdout.strip() == "NOT REPLACED"
    else:
        assert json.loads(out.stdout) == {"tunables": MALLOC_TUNABLES, "argv": ["a", "b c"]}


def test_console_entry_point_reexecs_before_any_work(monkeypatch):
    """``ldm-jax`` (cli.run) re-executes itself as ``python -m ldm_jax.cli`` with its arguments."""
    calls = []

    class Replaced(Exception):
        pass

    def fake_execve(path, args, env):
        calls.append((path, args, env.get("GLIBC_TUNABLES")))
        raise Replaced

    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LDM_JAX_HUGEPAGE_MALLOC", raising=False)
    monkeypatch.setattr(sys, "argv", ["ldm-jax", "demo", "--out", "x"])
    monkeypatch.setattr(cli, "main", lambda argv=None: pytest.fail("main ran before the re-exec"))
    if hugepage_malloc_env(os.environ) is None:
        pytest.skip("no glibc >= 2.35 here: the entry point runs main directly")
    with pytest.raises(Replaced):
        cli.run()
    assert calls == [(sys.executable, [sys.executable, "-m", "ldm_jax.cli", "demo", "--out", "x"], MALLOC_TUNABLES)]


def test_runner_execs_a_command_under_the_tunables():
    """``python -m ldm_jax.malloc_env CMD...`` runs CMD with the tunables (what ``make test`` does),
    and leaves a user's own ``glibc.malloc.hugetlb`` choice alone."""
    show = [sys.executable, "-c", "import os, sys; print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])", "a", "b c"]
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LDM_JAX_HUGEPAGE_MALLOC")}
    run = lambda e: subprocess.run([sys.executable, "-m", "ldm_jax.malloc_env", *show], env=e,  # noqa: E731
                                   capture_output=True, text=True, timeout=120)
    out = run(env)
    assert out.returncode == 0, out.stderr
    expected = MALLOC_TUNABLES if hugepage_malloc_env(env) is not None else None
    assert out.stdout.strip() == f"{expected} ['a', 'b c']"
    out = run({**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert out.stdout.strip() == "glibc.malloc.hugetlb=0 ['a', 'b c']"
    assert subprocess.run([sys.executable, "-m", "ldm_jax.malloc_env"], env=env, capture_output=True,
                          timeout=120).returncode != 0  # no command: a usage error


def test_make_test_runs_pytest_through_the_runner():
    """``make test`` (pytest is no ``ldm-jax`` re-exec) goes through that runner: one implementation
    of the tunables, no copy of the string in the Makefile."""
    makefile = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Makefile")).read()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "$(PY) -m ldm_jax.malloc_env $(PY) -m pytest" in recipe
    assert "glibc.malloc" not in makefile
