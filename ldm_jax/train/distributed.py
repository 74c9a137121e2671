"""Multi-process start-up: ``jax.distributed`` from a config, flags or the environment.

The training loop calls :func:`initialize_from_config` with ``config.distributed``: ``enabled=True``
lets JAX detect the cluster (TPU pods, SLURM); a coordinator address, process count and process id
set it up explicitly (local tests). ``python -m ldm_jax.launch`` covers what a config file cannot know:
a coordinator chosen by the launcher (``launch/local.sh``), given as flags or as
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.

Under ``srun`` with more than one task it initialises from SLURM's variables (JAX's detection).
``launch/slurm_gpu.sbatch`` and ``launch/tpu_pod.sh`` run plain ``ldm-jax train`` with
``--config.distributed.enabled=True`` instead.
Once initialised, the trainers' own call is a no-op.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

__all__ = ["distributed_params", "maybe_initialize_distributed", "initialize_from_config"]


def distributed_params(coordinator_address: str | None = None, num_processes: int | None = None,
                       process_id: int | None = None, environ: Mapping[str, str] | None = None) -> dict | None:
    """What to pass to ``jax.distributed.initialize``, or None for a single process.

    Order: the arguments, then ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``, then an ``srun`` step of more than one task (``{}``: JAX reads SLURM's
    variables). The batch script itself (no ``SLURM_STEP_NUM_TASKS``) stays a single process.
    """
    env = os.environ if environ is None else environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    given = {k: v for k, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                               ("process_id", process_id)) if v is not None}
    if given:
        missing = {"coordinator_address", "num_processes", "process_id"} - set(given)
        if missing:
            raise ValueError(f"jax.distributed needs coordinator address, number of processes and process id; "
                             f"missing: {', '.join(sorted(missing))}")
        if not 0 <= given["process_id"] < given["num_processes"]:
            raise ValueError(f"process id {given['process_id']} is not in [0, {given['num_processes']})")
        return given
    if int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return {}
    return None


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """``jax.distributed.initialize`` once if :func:`distributed_params` finds a multi-process set-up.

    Returns whether JAX runs distributed afterwards. Must run before anything touches a device.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    params = distributed_params(coordinator_address, num_processes, process_id)
    if params is None:
        return False
    jax.distributed.initialize(**params)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def initialize_from_config(distributed: Mapping) -> bool:
    """``jax.distributed.initialize`` once for a config's ``distributed`` section: explicit with a
    ``coordinator_address`` (then ``num_processes`` and ``process_id`` too), JAX's cluster detection
    with ``enabled=True``, else nothing. Returns whether JAX runs distributed afterwards."""
    import jax

    if jax.distributed.is_initialized():
        return True
    if distributed["coordinator_address"]:
        return maybe_initialize_distributed(distributed["coordinator_address"], int(distributed["num_processes"]),
                                            int(distributed["process_id"]))
    if distributed["enabled"]:
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
        return True
    return False
