"""launch/ scripts: syntax, --dry-run commands, argument errors, and runs against fake gcloud/srun/python.

No cloud or cluster is touched: dry runs only print, and the other runs put stand-ins for
``gcloud``, ``srun`` and ``python`` first on PATH that record their arguments.
"""
import os
import re
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu_pod.sh", "launch/slurm_gpu.sbatch", "launch/local.sh"]


def sh(script, *args, env=None, check=True):
    full_env = dict(os.environ)
    full_env.update(env or {})
    out = subprocess.run(["bash", os.path.join(ROOT, script), *args], cwd=ROOT, env=full_env, text=True,
                         capture_output=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def lines(out):
    return [shlex.split(line) for line in out.stdout.strip().splitlines()]


def fake_tool(tmp_path, name, body=""):
    """An executable ``name`` on a fresh PATH dir that appends its argv (one JSON line) to ``name``.log."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / f"{name}.log"
    path = bindir / name
    path.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                                if k.startswith(("CUDA_", "SLURM_"))}}}}) + "\\n")
        """) + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}, log


def calls(log):
    import json

    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_are_executable_and_strict(script):
    path = os.path.join(ROOT, script)
    subprocess.run(["bash", "-n", path], check=True)
    assert os.stat(path).st_mode & stat.S_IXUSR, f"{script} is not executable"
    text = open(path).read()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    help_ = sh(script, "--help")
    assert "--dry-run" in help_.stdout and "--config" in help_.stdout


def test_common_helpers_parse_and_are_sourced_not_run():
    path = os.path.join(ROOT, "launch/common.sh")
    subprocess.run(["bash", "-n", path], check=True)
    assert not os.stat(path).st_mode & stat.S_IXUSR, "common.sh is sourced, not run"
    for script in ("launch/local.sh", "launch/tpu_pod.sh"):
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"' in open(os.path.join(ROOT, script)).read()


# ---------------------------------------------------------------------------------------------- TPU pod

TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
TPU_ARGS = ["--name", "pod-1", "--zone", "us-central2-b", "--project", "my-proj", "--accelerator-type", "v4-64",
            "--config", "tiny_train", "--workdir", "gs://bucket/runs/a"]
OVERRIDES = ["--config.train.lr=1e-4", "--config.stages=[{'resolution': 16, 'steps': 2, 'batch_size': 4}]"]


def test_tpu_pod_dry_run_up_prints_every_step():
    out = sh("launch/tpu_pod.sh", "--dry-run", *TPU_ARGS, *OVERRIDES)
    text = out.stdout.strip().splitlines()
    where = ["--zone=us-central2-b", "--project=my-proj"]
    # create or reuse
    describe, create = text[0].split(" >/dev/null 2>&1 || ")
    assert shlex.split(describe) == TPU + ["describe", "pod-1"] + where
    assert shlex.split(create) == TPU + ["create", "pod-1"] + where + ["--accelerator-type=v4-64",
                                                                      "--version=tpu-ubuntu2204-base"]
    cmds = [shlex.split(line) for line in text[1:]]
    tar, scp, install, train, logs = cmds
    assert tar[:3] == ["tar", "-czf", "/tmp/ldm_jax_src.tgz"] and tar[3:5] == ["-C", ROOT] and "--exclude=.venv" in tar
    assert scp == TPU + ["scp", "/tmp/ldm_jax_src.tgz", "pod-1:~/ldm_jax_src.tgz"] + where + ["--worker=all"]
    assert install[:6] == TPU + ["ssh", "pod-1"] and install[6:-2] == where + ["--worker=all"]
    assert install[-2] == "--command" and "pip install -q -e . \"jax[tpu]\"" in install[-1]
    assert "tar -xzf ~/ldm_jax_src.tgz -C ~/ldm_jax" in install[-1]
    assert train[:-1] == TPU + ["ssh", "pod-1"] + where + ["--worker=all", "--command"]
    remote = shlex.split(train[-1].split("nohup ", 1)[1].split(" > ")[0])
    assert remote == ["ldm-jax", "train", "--config", "tiny_train", "--workdir", "gs://bucket/runs/a",
                      "--config.distributed.enabled=True"] + OVERRIDES
    assert train[-1].startswith("cd ~/ldm_jax && ") and "> ~/ldm_jax_train.log 2>&1" in train[-1]
    assert logs == TPU + ["ssh", "pod-1"] + where + ["--worker=0", "--command", "tail -n +1 -F ~/ldm_jax_train.log"]


def test_tpu_pod_dry_run_other_actions():
    base = ["--dry-run", "--name", "p", "--zone=z"]
    (stop,) = lines(sh("launch/tpu_pod.sh", "stop", *base))
    assert stop[:8] == TPU + ["ssh", "p", "--zone=z", "--worker=all"] and "kill -TERM" in stop[-1]
    assert lines(sh("launch/tpu_pod.sh", "delete", *base)) == [TPU + ["delete", "p", "--zone=z", "--quiet"]]
    (install,) = lines(sh("launch/tpu_pod.sh", "install", *base, "--repo", "https://example.com/x.git",
                          "--branch", "dev"))
    assert install[-2] == "--command" and "git clone -q --branch dev https://example.com/x.git ~/ldm_jax" in install[-1]
    assert "--version=v2-alpha-tpuv5-lite" in sh("launch/tpu_pod.sh", "create", *base,
                                                   "--version", "v2-alpha-tpuv5-lite").stdout


@pytest.mark.parametrize("args, message", [
    (["--zone", "z"], "--name is required"),
    (["--name", "p"], "--zone is required"),
    (["--name", "p", "--zone", "z"], "--workdir is required"),
    (["train", "--name", "p", "--zone", "z"], "--workdir is required"),
    (["--name", "--zone", "z"], "--name needs a value"),
    (["launch", "--name", "p", "--zone", "z"], "unknown argument: launch"),
    (["stop", "delete", "--name", "p", "--zone", "z"], "two actions"),
    (["--name", "p", "--zone", "z", "--bogus", "1"], "unknown argument: --bogus"),
])
def test_tpu_pod_rejects_bad_arguments(args, message):
    out = sh("launch/tpu_pod.sh", "--dry-run", *args, check=False)
    assert out.returncode != 0 and message in out.stderr and "usage: launch/tpu_pod.sh" in out.stderr
    assert out.stdout == ""


def test_tpu_pod_create_reuses_an_existing_vm(tmp_path):
    env, log = fake_tool(tmp_path, "gcloud", 'sys.exit(int(os.environ.get("FAKE_DESCRIBE_RC", "0")) '
                                             'if "describe" in sys.argv else 0)\n')
    sh("launch/tpu_pod.sh", "create", "--name", "p", "--zone", "z", env=dict(env, FAKE_DESCRIBE_RC="0"))
    assert [c["argv"][3] for c in calls(log)] == ["describe"]
    log.unlink()
    sh("launch/tpu_pod.sh", "create", "--name", "p", "--zone", "z", env=dict(env, FAKE_DESCRIBE_RC="1"))
    assert [c["argv"][3] for c in calls(log)] == ["describe", "create"]


def test_tpu_pod_train_runs_the_printed_commands(tmp_path):
    env, log = fake_tool(tmp_path, "gcloud")
    args = ["train", "--name", "p", "--zone", "z", "--workdir", "gs://b/r", "--config.train.lr=1e-4"]
    dry = lines(sh("launch/tpu_pod.sh", "--dry-run", *args))
    sh("launch/tpu_pod.sh", *args, env=env)
    assert [c["argv"] for c in calls(log)] == [cmd[1:] for cmd in dry]


# ---------------------------------------------------------------------------------------------- SLURM

def _sbatch_headers():
    text = open(os.path.join(ROOT, "launch/slurm_gpu.sbatch")).read()
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))


def test_slurm_dry_run_prints_srun_matching_the_headers():
    h = _sbatch_headers()
    assert h["ntasks-per-node"] == h["gpus-per-node"], "one task per GPU"
    for how in (["--dry-run"], []):
        env = {} if how else {"DRY_RUN": "1"}
        (cmd,) = lines(sh("launch/slurm_gpu.sbatch", *how, "--config", "sd_v1_train",
                          "--workdir=/shared/run 1", *OVERRIDES, env=env))
        assert cmd == ["srun", f"--nodes={h['nodes']}", f"--ntasks-per-node={h['ntasks-per-node']}",
                       f"--gpus-per-node={h['gpus-per-node']}", f"--cpus-per-task={h['cpus-per-task']}",
                       "--gpu-bind=none", "--kill-on-bad-exit=1", "ldm-jax", "train",
                       "--config", "sd_v1_train", "--workdir", "/shared/run 1",
                       "--config.distributed.enabled=True"] + OVERRIDES


def test_slurm_sizes_follow_the_job(tmp_path):
    env = {"DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_PER_TASK": "6",
           "LDM_JAX": "/opt/venv/bin/ldm-jax"}
    (cmd,) = lines(sh("launch/slurm_gpu.sbatch", "--config", "c.py", "--workdir", "w", env=env))
    assert cmd[1:5] == ["--nodes=4", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=6"]
    assert cmd[7] == "/opt/venv/bin/ldm-jax"


def test_slurm_runs_srun_inside_a_job_and_refuses_outside(tmp_path):
    env, log = fake_tool(tmp_path, "srun")
    args = ["--config", "tiny_train", "--workdir", str(tmp_path / "w")]
    out = sh("launch/slurm_gpu.sbatch", *args, env=env, check=False)
    assert out.returncode != 0 and "not inside a SLURM job" in out.stderr and not calls(log)
    job = dict(env, SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4")
    dry = lines(sh("launch/slurm_gpu.sbatch", "--dry-run", *args, env=job))
    sh("launch/slurm_gpu.sbatch", *args, env=job)
    assert [c["argv"] for c in calls(log)] == [dry[0][1:]]


@pytest.mark.parametrize("args, message", [
    (["--workdir", "w"], "--config is required"),
    (["--config", "c"], "--workdir is required"),
    (["--config", "c", "--workdir"], "--workdir needs a value"),
    (["--config", "c", "--workdir", "w", "--nodes=2"], "unknown argument: --nodes=2"),
])
def test_slurm_rejects_bad_arguments(args, message):
    out = sh("launch/slurm_gpu.sbatch", "--dry-run", *args, check=False)
    assert out.returncode != 0 and message in out.stderr and "usage: sbatch launch/slurm_gpu.sbatch" in out.stderr


# ---------------------------------------------------------------------------------------------- local

def test_local_dry_run_prints_one_command_per_process():
    out = sh("launch/local.sh", "--dry-run", "--nproc", "3", "--port=23456", "--config", "tiny_train",
             "--workdir", "runs/a b", *OVERRIDES, env={"PYTHON": "/venv/bin/python"})
    text = out.stdout.strip().splitlines()
    assert len(text) == 3
    for i, line in enumerate(text):
        cmd = shlex.split(line)
        if i:
            assert cmd[-3:] == [">", f"runs/a b/logs/process_{i}.log", "2>&1"]
            cmd = cmd[:-3]
        assert cmd == ["/venv/bin/python", "-m", "ldm_jax.launch", "--coordinator", "127.0.0.1:23456",
                       "--num-processes", "3", "--process-id", str(i), "train", "--config", "tiny_train",
                       "--workdir", "runs/a b"] + OVERRIDES


def test_local_gpus_per_process_partitions_devices():
    out = sh("launch/local.sh", "--dry-run", "--nproc", "2", "--gpus-per-process", "2", "--config", "c",
             "--workdir", "w")
    envs = [shlex.split(line)[:2] for line in out.stdout.strip().splitlines()]
    assert envs == [["env", "CUDA_VISIBLE_DEVICES=0,1"], ["env", "CUDA_VISIBLE_DEVICES=2,3"]]


@pytest.mark.parametrize("args, message", [
    (["--workdir", "w"], "--config is required"),
    (["--config", "c"], "--workdir is required"),
    (["--config", "c", "--workdir", "w", "--nproc", "0"], "--nproc must be a positive integer"),
    (["--config", "c", "--workdir", "w", "--nproc", "two"], "--nproc must be a positive integer"),
    (["--config", "c", "--workdir", "w", "--port", "x"], "--port must be a number"),
    (["--config", "c", "--workdir", "w", "extra"], "unknown argument: extra"),
    (["--config"], "--config needs a value"),
    (["--config", "c", "--workdir", "--nproc", "2"], "--workdir needs a value"),
    (["--config", "c", "--workdir", "w", "--bogus=1"], "unknown argument: --bogus=1"),
])
def test_local_rejects_bad_arguments(args, message):
    out = sh("launch/local.sh", "--dry-run", *args, check=False)
    assert out.returncode != 0 and message in out.stderr and "usage: launch/local.sh" in out.stderr


def test_local_starts_every_process_and_propagates_failure(tmp_path):
    env, log = fake_tool(tmp_path, "python", 'sys.exit(int(os.environ.get("FAKE_FAIL_ID", "-1") == '
                                             'sys.argv[sys.argv.index("--process-id") + 1]) * 3)\n')
    env["PYTHON"] = "python"
    args = ["--nproc", "3", "--config", "tiny_train", "--workdir", str(tmp_path / "w"),
            "--gpus-per-process", "1", "--config.train.lr=1e-4"]
    dry = [shlex.split(line) for line in sh("launch/local.sh", "--dry-run", *args, env=env).stdout.splitlines()]
    sh("launch/local.sh", *args, env=env)
    got = sorted((c["argv"], c["env"]["CUDA_VISIBLE_DEVICES"]) for c in calls(log))
    want = sorted((cmd[3:cmd.index(">") if ">" in cmd else None], cmd[1].split("=")[1]) for cmd in dry)
    assert got == want
    assert sorted(os.listdir(tmp_path / "w" / "logs")) == ["process_1.log", "process_2.log"]
    out = sh("launch/local.sh", *args, env=dict(env, FAKE_FAIL_ID="1"), check=False)
    assert out.returncode == 3 and "exited with status 3" in out.stderr


# ---------------------------------------------------------------------------------------------- shared parsing

def _equals_form(args, every=1):
    """``args`` with every ``every``-th ``--opt value`` pair written ``--opt=value``."""
    out, rest, n = [], list(args), 0
    while rest:
        word = rest.pop(0)
        if word.startswith("--"):
            value = rest.pop(0)
            out += [f"{word}={value}"] if n % every == 0 else [word, value]
            n += 1
        else:
            out.append(word)
    return out


@pytest.mark.parametrize("script, args", [
    ("launch/local.sh", ["--nproc", "3", "--port", "23456", "--gpus-per-process", "1",
                         "--config", "tiny_train", "--workdir", "runs/a=b c"]),
    ("launch/tpu_pod.sh", ["up", *TPU_ARGS, "--repo", "https://example.com/x.git?a=b", "--branch", "dev"]),
])
def test_option_equals_value_gives_the_same_command(script, args):
    two_words = sh(script, "--dry-run", *args, *OVERRIDES).stdout
    assert len(two_words.splitlines()) >= 3
    for every in (1, 2):  # all options as --opt=value, then every other one
        equals = _equals_form(args, every)
        assert len(equals) < len(args)
        assert sh(script, "--dry-run", *equals, *OVERRIDES).stdout == two_words


# ---------------------------------------------------------------------------------------------- ldm_jax.launch, ldm_jax.train.distributed

def test_distributed_params_resolution():
    from ldm_jax.train.distributed import distributed_params

    assert distributed_params(environ={}) is None
    assert distributed_params("127.0.0.1:1", 2, 1, environ={}) == dict(coordinator_address="127.0.0.1:1",
                                                                        num_processes=2, process_id=1)
    env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed_params(environ=env) == dict(coordinator_address="h:9", num_processes=4, process_id=3)
    assert distributed_params(process_id=0, environ=env)["process_id"] == 0  # flags win over the environment
    slurm = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "5", "SLURM_NTASKS": "16"}
    assert distributed_params(environ=slurm) == {}  # JAX reads SLURM's variables
    assert distributed_params(environ={"SLURM_NTASKS": "16", "SLURM_PROCID": "0"}) is None  # the batch script
    with pytest.raises(ValueError, match="missing: num_processes, process_id"):
        distributed_params("h:1", environ={})
    with pytest.raises(ValueError, match="not in"):
        distributed_params("h:1", 2, 2, environ={})


def test_distributed_module_initialises_two_local_processes():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("from ldm_jax.train.distributed import maybe_initialize_distributed as m; assert m(); "
            "import jax; print(jax.process_index(), jax.process_count(), jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(env, JAX_PROCESS_ID=str(i)), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert sorted(o[0].split()[0] for o in outs) == ["0", "1"]
    assert all(o[0].split()[1:] == ["2", "2"] for o in outs)


def test_distributed_module_cli_errors():
    out = subprocess.run([sys.executable, "-m", "ldm_jax.launch", "--coordinator", "h:1", "train"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "missing: num_processes, process_id" in out.stderr
    out = subprocess.run([sys.executable, "-m", "ldm_jax.launch"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "no ldm-jax command" in out.stderr


# ------------------------------------------------------------------------------------- README commands

def _readme_commands(section):
    """The shell commands of the README's code block under ``section`` (continuations joined)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split(f"## {section}", 1)[1].split("```", 2)[1]
    joined = re.sub(r"\\\n\s*", "", block)
    return [c for c in (shlex.split(ln, comments=True) for ln in joined.splitlines()) if c]


def _train_config(argv):
    """The config an ``ldm-jax train ...`` command line builds (parsed as the CLI parses it)."""
    from ldm_jax.cli import _split_overrides, build_parser
    from ldm_jax.config_utils import load_config

    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    assert args.command == "train"
    return load_config(args.config, overrides), args.workdir


def test_readme_pod_and_cluster_commands_start_the_training_they_describe(tmp_path):
    """Each launch command of the README's pod section, run against stand-ins for gcloud and srun (and
    local.sh dry), reaches the workers as an ``ldm-jax train`` command whose config loads and keeps the
    README's pretrained source, workdir and per-stage latent caches."""
    cmds = {}
    for c in _readme_commands("Training on a pod or a cluster"):
        cmds.setdefault(c[0], []).append(c)
    assert {"launch/tpu_pod.sh", "sbatch", "launch/local.sh", "ldm-jax"} <= set(cmds), list(cmds)

    (tmp_path / "tpu").mkdir()
    env, log = fake_tool(tmp_path / "tpu", "gcloud")
    for tpu in cmds["launch/tpu_pod.sh"]:  # up, then stop
        sh(tpu[0], *tpu[1:], env=env)
    (train,) = [c["argv"][-1] for c in calls(log) if "ldm-jax train" in c["argv"][-1]]
    argv = shlex.split(train.split("nohup ", 1)[1].split(" > ", 1)[0])
    config, workdir = _train_config(argv[1:])
    assert workdir == "gs://my-bucket/runs/sd" and config.distributed.enabled
    assert config.init.pretrained == "gs://my-bucket/models/sd-v1-5" and config.mesh.fsdp == 4
    assert len(config.data.cached_latents.split(",")) == len(config.stages) == 2

    (sbatch,) = cmds["sbatch"]
    script = next(i for i, a in enumerate(sbatch) if a.endswith(".sbatch"))
    job = {k.lstrip("-").replace("-", "_"): v for k, v in (a.split("=", 1) for a in sbatch[1:script])}
    (tmp_path / "slurm").mkdir()
    env, log = fake_tool(tmp_path / "slurm", "srun")
    env.update(SLURM_JOB_ID="1", SLURM_JOB_NUM_NODES=job["nodes"], SLURM_GPUS_ON_NODE=job["gpus_per_node"])
    sh(sbatch[script], *sbatch[script + 1:], env=env)
    (srun,) = [c["argv"] for c in calls(log)]
    assert f"--nodes={job['nodes']}" in srun and f"--ntasks-per-node={job['ntasks_per_node']}" in srun
    config, workdir = _train_config(srun[srun.index("ldm-jax") + 1:])
    assert config.init.pretrained == "/shared/models/sd-v1-5" and workdir == "/shared/runs/sd"

    (local,) = cmds["launch/local.sh"]
    dry = lines(sh(local[0], "--dry-run", *local[1:]))
    assert len(dry) == 2  # --nproc 2
    for cmd in dry:
        argv = cmd[cmd.index("train"):]
        argv = argv[:argv.index(">")] if ">" in argv else argv
        config, workdir = _train_config(argv)
        assert config.init.pretrained and workdir.startswith("gs://")
