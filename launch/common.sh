# Helpers shared by launch/local.sh and launch/tpu_pod.sh, which source this file from their own
# directory. launch/slurm_gpu.sbatch keeps a copy of them: sbatch runs a spooled copy of the script.
#
# The sourcing script sets USAGE (printed after an error) and, before parse_options, the variables
# of its options with their defaults, VALUE_OPTIONS, DRY_RUN=0 and OVERRIDES=().
# shellcheck shell=bash

# The script's header comment (line 2 up to `set -euo`), without the leading "# ".
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

die() { echo "${0##*/}: $*" >&2; echo "$USAGE" >&2; exit 2; }

# Print a command as a copy-pastable shell line.
quote() {
  local a out=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

# Run a command, or print it under --dry-run.
run() { if ((DRY_RUN)); then quote "$@"; else "$@"; fi; }

# parse_options "$@": -h/--help prints the usage and exits; --dry-run sets DRY_RUN=1; --config.*
# goes to OVERRIDES; an option named in the associative array VALUE_OPTIONS (option -> variable)
# takes a value, as --opt VALUE or --opt=VALUE (not empty, not starting with --). Other words go to
# positional_arg WORD when the script defines that function; anything else is an error.
parse_options() {
  local var
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --config.*) OVERRIDES+=("$1") ;;
      --*=*)
        value_variable "${1%%=*}" >/dev/null || die "unknown argument: $1"
        set -- "${1%%=*}" "${1#*=}" "${@:2}"
        continue ;;
      --*)
        var=$(value_variable "$1") || die "unknown argument: $1"
        (($# >= 2)) && [[ -n $2 && $2 != --* ]] || die "$1 needs a value"
        printf -v "$var" '%s' "$2"
        shift ;;
      *)
        declare -F positional_arg >/dev/null || die "unknown argument: $1"
        positional_arg "$1" ;;
    esac
    shift
  done
}

# The variable of value option $1 (see parse_options); fails for other words.
value_variable() {
  [[ -n ${VALUE_OPTIONS[$1]+set} ]] && echo "${VALUE_OPTIONS[$1]}"
}
