"""``python -m ldm_jax.launch``: start ``jax.distributed`` from flags or the environment, then run an
``ldm-jax`` command in this process (what ``launch/local.sh`` starts once per process)::

    python -m ldm_jax.launch --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 \\
        train --config configs/tiny_train.py --workdir runs/tiny

Flags not given come from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``;
under ``srun`` with several tasks, from SLURM's variables (:mod:`ldm_jax.train.distributed`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ldm_jax.train import distributed

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ldm_jax.launch",
        description="Initialise jax.distributed, then run an ldm-jax command (everything after the flags).")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (default $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, help="default $JAX_NUM_PROCESSES")
    p.add_argument("--process-id", type=int, default=None, help="default $JAX_PROCESS_ID")
    p.add_argument("command", nargs=argparse.REMAINDER, help="ldm-jax arguments, e.g. train --config ... --workdir ...")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no ldm-jax command given (e.g. train --config configs/tiny_train.py --workdir runs/x)")
    try:
        distributed.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    except ValueError as err:
        p.error(str(err))
    from ldm_jax.cli import cli as run_cli

    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())
