#!/usr/bin/env bash
# Train with N jax.distributed processes on this machine (coordinator on 127.0.0.1).
#
#   launch/local.sh --nproc 2 --config tiny_train --workdir runs/local [--config.x=y ...]
#
# Process i runs
#   python -m ldm_jax.launch --coordinator 127.0.0.1:PORT --num-processes N --process-id i \
#       train --config ... --workdir ... [--config.x=y ...]
# Process 0 prints to this terminal; process i > 0 logs to LOG_DIR/process_i.log. If one process
# fails the others are stopped and the exit status is the failed one's. SIGTERM or Ctrl-C reaches
# every process, which checkpoints and exits; the script returns when they have (status 143 / 130).
#
# Options:
#   --nproc N               processes (default 2)
#   --config NAME           a packaged recipe or a config file (required)
#   --workdir DIR           shared by all processes, a local path or gs://bucket/run (required)
#   --port P                coordinator port (default 12355)
#   --gpus-per-process K    give process i the GPUs i*K .. i*K+K-1 (CUDA_VISIBLE_DEVICES); default:
#                           do not restrict (CPU, or one process per machine)
#   --log-dir DIR           process logs (default WORKDIR/logs; ./logs for a bucket workdir)
#   --dry-run               print the commands instead of running them
#   --config.a.b=v          config overrides, passed to every process
# Environment: PYTHON (default python3) runs ldm_jax. Needs bash >= 4.4.
set -euo pipefail

USAGE="usage: launch/local.sh [--nproc N] --config NAME --workdir DIR [--port P] [--gpus-per-process K] [--log-dir DIR] [--dry-run] [--config.a.b=v ...]"
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage, die, quote, parse_options

NPROC=2 CONFIG="" WORKDIR="" PORT=12355 GPUS_PER_PROCESS=0 LOG_DIR="" DRY_RUN=0 OVERRIDES=()
declare -A VALUE_OPTIONS=([--nproc]=NPROC [--config]=CONFIG [--workdir]=WORKDIR [--port]=PORT
                          [--gpus-per-process]=GPUS_PER_PROCESS [--log-dir]=LOG_DIR)
parse_options "$@"
if [[ -z $LOG_DIR ]]; then  # a bucket workdir (gs://...) keeps the process logs on this machine
  if [[ $WORKDIR == *://* ]]; then LOG_DIR=logs; else LOG_DIR=$WORKDIR/logs; fi
fi
[[ -n $CONFIG ]] || die "--config is required"
[[ -n $WORKDIR ]] || die "--workdir is required"
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$NPROC'"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
[[ $GPUS_PER_PROCESS =~ ^[0-9]+$ ]] || die "--gpus-per-process must be a number, got '$GPUS_PER_PROCESS'"

PYTHON=${PYTHON:-python3}
process_command() {  # $1: process id
  local env=()
  if ((GPUS_PER_PROCESS > 0)); then
    env=(env "CUDA_VISIBLE_DEVICES=$(seq -s, $(($1 * GPUS_PER_PROCESS)) $((($1 + 1) * GPUS_PER_PROCESS - 1)))")
  fi
  CMD=("${env[@]}" "$PYTHON" -m ldm_jax.launch --coordinator "127.0.0.1:$PORT"
       --num-processes "$NPROC" --process-id "$1" train --config "$CONFIG" --workdir "$WORKDIR" "${OVERRIDES[@]}")
}

if ((DRY_RUN)); then
  for ((i = 0; i < NPROC; i++)); do
    process_command "$i"
    if ((i == 0)); then quote "${CMD[@]}"; else echo "$(quote "${CMD[@]}") > $(quote "$LOG_DIR/process_$i.log") 2>&1"; fi
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
PIDS=()
# SIGTERM (or Ctrl-C) is passed on to every process, which writes a checkpoint and exits; the script
# waits for them, so it returns once the run is saved.
# shellcheck disable=SC2329  # called by the EXIT trap
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for ((i = 0; i < NPROC; i++)); do
  process_command "$i"
  if ((i == 0)); then "${CMD[@]}" & else "${CMD[@]}" >"$LOG_DIR/process_$i.log" 2>&1 & fi
  PIDS+=($!)
done
# Wait for the first process to finish; a failure stops the rest.
STATUS=0
for ((n = 0; n < NPROC; n++)); do
  wait -n || { STATUS=$?; echo "local.sh: a process exited with status $STATUS; stopping the others" >&2; break; }
done
exit "$STATUS"
