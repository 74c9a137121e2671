#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: every worker (host) runs the same `ldm-jax train` command.
#
#   launch/tpu_pod.sh [ACTION] --name NAME --zone ZONE [options] [--config.a.b=v ...]
#
# Actions (default: up):
#   up        create (or reuse) the TPU VM, install, start training, stream the log
#   create    create the TPU VM unless it exists
#   install   copy this checkout (or clone --repo) to ~/ldm_jax on every worker; pip install -e . jax[tpu]
#   train     start training on every worker (in the background, log ~/ldm_jax_train.log), stream the log
#   logs      stream worker 0's training log (Ctrl-C stops streaming, not training)
#   stop      SIGTERM the trainer on every worker (it writes a checkpoint, then exits)
#   delete    delete the TPU VM
#
# Options:
#   --name NAME               TPU VM name (required)
#   --zone ZONE               e.g. us-central2-b (required)
#   --project PROJECT         default: gcloud's configured project
#   --accelerator-type TYPE   default v4-32 (4 hosts x 4 chips)
#   --version VERSION         TPU software version, default tpu-ubuntu2204-base
#   --config NAME             a packaged recipe or a config file relative to the repo (default sd_v1_train)
#   --workdir DIR             run directory every worker sees under the same path, e.g. gs://bucket/run
#                             (required by up/train)
#   --repo URL                git clone URL instead of copying this checkout; --branch BRANCH (default main)
#   --dry-run                 print the commands instead of running them
#   --config.a.b=v            config overrides, passed to the trainer
# jax.distributed.initialize() finds the pod's hosts by itself (--config.distributed.enabled=True).
set -euo pipefail

USAGE="usage: launch/tpu_pod.sh [up|create|install|train|logs|stop|delete] --name NAME --zone ZONE [--project P]
       [--accelerator-type v4-32] [--version V] [--config NAME] [--workdir gs://...] [--repo URL] [--dry-run] [--config.a.b=v ...]"
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # usage, die, quote, run, parse_options

ACTION="" NAME="" ZONE="" PROJECT="" ACCELERATOR=v4-32 VERSION=tpu-ubuntu2204-base
CONFIG=sd_v1_train WORKDIR="" REPO="" BRANCH=main DRY_RUN=0 OVERRIDES=()
declare -A VALUE_OPTIONS=([--name]=NAME [--zone]=ZONE [--project]=PROJECT [--accelerator-type]=ACCELERATOR
                          [--version]=VERSION [--config]=CONFIG [--workdir]=WORKDIR [--repo]=REPO [--branch]=BRANCH)
positional_arg() {
  case $1 in
    up | create | install | train | logs | stop | delete)
      [[ -z $ACTION ]] || die "two actions given: $ACTION and $1"
      ACTION=$1 ;;
    *) die "unknown argument: $1" ;;
  esac
}
parse_options "$@"
ACTION=${ACTION:-up}
[[ -n $NAME ]] || die "--name is required"
[[ -n $ZONE ]] || die "--zone is required"
if [[ $ACTION == up || $ACTION == train ]]; then
  [[ -n $WORKDIR ]] || die "--workdir is required to train (a path every worker sees, e.g. gs://bucket/run)"
fi

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")
# shellcheck disable=SC2088  # ~ is expanded by the workers' shell
LOG='~/ldm_jax_train.log' PIDFILE='~/ldm_jax_train.pid'
on_workers() { run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command "$2"; }

do_create() {
  local describe=("${TPU[@]}" describe "$NAME" "${WHERE[@]}")
  local create=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
  if ((DRY_RUN)); then
    echo "$(quote "${describe[@]}") >/dev/null 2>&1 || $(quote "${create[@]}")"
  elif "${describe[@]}" >/dev/null 2>&1; then
    echo "tpu_pod.sh: reusing TPU VM $NAME" >&2
  else
    "${create[@]}"
  fi
}

do_install() {
  local fetch
  if [[ -n $REPO ]]; then
    fetch="if [ -d ~/ldm_jax/.git ]; then git -C ~/ldm_jax fetch -q origin $(quote "$BRANCH") && git -C ~/ldm_jax checkout -q -B $(quote "$BRANCH") FETCH_HEAD; else git clone -q --branch $(quote "$BRANCH") $(quote "$REPO") ~/ldm_jax; fi"
  else  # this checkout, as it is now (uncommitted edits included), without venvs and outputs
    local root tarball=/tmp/ldm_jax_src.tgz
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    run tar -czf "$tarball" -C "$root" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude=demo_out --exclude=runs .
    run "${TPU[@]}" scp "$tarball" "$NAME:~/ldm_jax_src.tgz" "${WHERE[@]}" --worker=all
    fetch="rm -rf ~/ldm_jax && mkdir -p ~/ldm_jax && tar -xzf ~/ldm_jax_src.tgz -C ~/ldm_jax"
  fi
  on_workers all "set -e; $fetch; cd ~/ldm_jax && python3 -m pip install -q -U pip && python3 -m pip install -q -e . \"jax[tpu]\""
}

do_train() {
  local cmd
  cmd=$(quote ldm-jax train --config "$CONFIG" --workdir "$WORKDIR" --config.distributed.enabled=True "${OVERRIDES[@]}")
  on_workers all "cd ~/ldm_jax && export PATH=\"\$HOME/.local/bin:\$PATH\" && nohup $cmd > $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE"
  do_logs
}

do_logs() { on_workers 0 "tail -n +1 -F $LOG"; }
do_stop() { on_workers all "if [ -f $PIDFILE ]; then kill -TERM \$(cat $PIDFILE) 2>/dev/null || true; rm -f $PIDFILE; fi"; }
do_delete() { run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet; }

case $ACTION in
  up) do_create; do_install; do_train ;;
  create) do_create ;;
  install) do_install ;;
  train) do_train ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
esac
