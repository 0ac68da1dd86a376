# shellcheck shell=bash disable=SC2034
# Sourced by the launch/tpu_vm scripts: their shared flags, the wrapper that prints or runs
# a command, and what an accelerator type implies (hosts, plan topology, runtime version).
# Written for bash 3.2 too (a laptop's /bin/bash on macOS). Its variables are read by the
# scripts that source it (hence SC2034 off).

PROG=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# On every worker, relative to the home directory an ssh session starts in.
REMOTE_DIR=mllm_jax
REMOTE_VENV=mllm_jax-venv

NAME="" ZONE="" PROJECT="" ACCELERATOR="" DRY_RUN=0

usage() { printf '%s\n' "$USAGE"; }
usage_error() { printf '%s: %s\n\n' "$PROG" "$1" >&2; usage >&2; exit 2; }
fail() { printf '%s: %s\n' "$PROG" "$1" >&2; exit 1; }

need_value() {  # FLAG [VALUE]: a flag that takes a value got one
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || usage_error "$1 needs a value"
}

require() {  # FLAG VALUE: exit 2 naming FLAG when it was not given
  [[ -n $2 ]] || usage_error "missing required flag $1"
}

# The flags every script takes (so one set of them can be reused across the scripts).
# Sets SHIFT to the number of words used.
common_flag() {
  SHIFT=2
  case $1 in
    --name|--zone|--project|--accelerator-type) need_value "$@" ;;
  esac
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCELERATOR=$2 ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage_error "unknown flag $1" ;;
  esac
}

shell_words() {  # the words as one line a shell reads back as them (Python's shlex.join)
  local word out="" safe='^[A-Za-z0-9_@%+=:,./-]+$' q="'\"'\"'"
  for word in "$@"; do
    if [[ ! $word =~ $safe ]]; then
      word="'${word//\'/$q}'"
    fi
    out+="${out:+ }$word"
  done
  printf '%s\n' "$out"
}

run() {  # prints the command with --dry-run; otherwise shows it on stderr and runs it
  if ((DRY_RUN)); then
    shell_words "$@"
    return 0
  fi
  printf '+ %s\n' "$(shell_words "$@")" >&2
  "$@"
}

gcloud_tpus() {  # GROUP VERB ARGS...: gcloud compute tpus GROUP VERB NAME --zone ARGS...
  local group=$1 verb=$2
  shift 2
  run gcloud compute tpus "$group" "$verb" "$NAME" "--zone=$ZONE" "$@" \
    ${PROJECT:+"--project=$PROJECT"}
}

power_of_two() { (($1 > 0 && ($1 & ($1 - 1)) == 0)); }

grid_2d() {  # CHIPS -> AxB, A <= B, as v5e and v6e slices are shaped
  local a=1
  while ((4 * a * a <= $1)); do a=$((2 * a)); done
  printf '%sx%s' "$a" $(($1 / a))
}

torus_3d() {  # CHIPS (4 or more) -> AxBxC as v4 and v5p slices are shaped: from 2x2x1,
  # each doubling goes to the last of the smallest dimensions (2x2x2, 2x2x4, 2x4x4, 4x4x4)
  local d0=2 d1=2 d2=1
  while ((d0 * d1 * d2 < $1)); do
    if ((d2 <= d1 && d2 <= d0)); then d2=$((2 * d2))
    elif ((d1 <= d0)); then d1=$((2 * d1))
    else d0=$((2 * d0)); fi
  done
  printf '%sx%sx%s' "$d0" "$d1" "$d2"
}

# Sets CHIPS, WORKERS (hosts), TOPOLOGY (as `mllm-jax plan --topology` names it; empty for
# a slice size this cannot shape) and RUNTIME_VERSION (the TPU software version for JAX).
accelerator_facts() {
  local kind n
  [[ $1 =~ ^(v4|v5p|v5litepod|v6e)-([0-9]+)$ ]] ||
    usage_error "unknown accelerator type '$1' (expected v4-N, v5p-N, v5litepod-N or v6e-N)"
  kind=${BASH_REMATCH[1]}
  n=${BASH_REMATCH[2]}
  TOPOLOGY=""
  case $kind in
    v4|v5p)  # N counts TensorCores: two per chip, four chips per host
      CHIPS=$((n / 2))
      WORKERS=$(((CHIPS + 3) / 4))
      if power_of_two "$CHIPS" && ((CHIPS >= 4)); then
        TOPOLOGY=$kind:$(torus_3d "$CHIPS")
      fi ;;
    v5litepod|v6e)  # N counts chips: up to eight on one host, four per host beyond
      CHIPS=$n
      WORKERS=$((n <= 8 ? 1 : n / 4))
      if power_of_two "$n"; then
        TOPOLOGY=${kind/v5litepod/v5e}:$(grid_2d "$n")
      fi ;;
  esac
  case $kind in
    v4) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5p) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v6e) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
  esac
}

# Reads `mllm-jax plan` output on stdin; argv: script, config, topology, limit. Exits 1
# saying why when a program does not compile or needs more than `limit` of a chip's HBM.
PLAN_VERDICT='
import json, sys
prog, config, topology, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
plans = [json.loads(line) for line in sys.stdin if line.startswith("{")]
if not plans:
    sys.exit(f"{prog}: refusing {config} on {topology}: the plan printed no JSON line")
for plan in plans:
    program, fraction = plan.get("program"), plan.get("memory_fraction")
    what = f"{prog}: refusing {config} on {topology}: {program}"
    if not plan.get("compiles"):
        sys.exit(f"{what} does not compile (memory_fraction {fraction})")
    if fraction is None or fraction > limit:
        sys.exit(f"{what} needs memory_fraction {fraction} of HBM per chip, above "
                 f"{limit} (--max-memory-fraction)")
    print(f"{prog}: plan: {config} on {topology}: {program} fits, memory_fraction "
          f"{fraction} (limit {limit})", file=sys.stderr)
'

plan_check() {  # CONFIG TOPOLOGY LIMIT [OVERRIDES...]: refuses what the plan says won't fit
  local config=$1 topology=$2 limit=$3 out status=0
  shift 3
  local cmd=(mllm-jax plan --config "$config" --topology "$topology" "$@")
  if ((DRY_RUN)); then
    shell_words "${cmd[@]}"
    return 0
  fi
  printf '+ %s\n' "$(shell_words "${cmd[@]}")" >&2
  out=$("${cmd[@]}") || status=$?
  printf '%s\n' "$out"
  ((status == 0)) ||
    fail "refusing $config on $topology: mllm-jax plan failed (exit $status); fix it or pass --skip-plan"
  python3 -c "$PLAN_VERDICT" "$PROG" "$config" "$topology" "$limit" <<<"$out" || exit 1
}
