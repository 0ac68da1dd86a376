#!/usr/bin/env bash
# Runs `mllm-jax train` on every worker of a TPU VM once the plan says the config fits.
set -euo pipefail
USAGE="usage: $(basename "$0") --name NAME --zone ZONE --accelerator-type TYPE [--project P]
       --config CONFIG --workdir WORKDIR [--topology T] [--max-memory-fraction F]
       [--skip-plan] [--logs DIR] [--dry-run] [-- --config.x=y ...]

Run from the repository root; CONFIG is a path inside it (the same path on the workers,
where setup.sh put the code). First \`mllm-jax plan --config CONFIG --topology T\` runs
here (T from the accelerator type, e.g. v5litepod-16 -> v5e:4x4; it needs libtpu:
pip install -e '.[tpu]'), and the run is refused if a program does not compile or needs
more than F (default 0.9) of a chip's HBM; --skip-plan skips this. Then every worker runs
\`mllm-jax train --config CONFIG --workdir WORKDIR\` plus the overrides after -- (also
given to the plan); on a multi-host slice each also gets --config.distributed.enabled=True
with its process id and the number of processes (JAX finds the coordinator itself).
WORKDIR should be shared by all workers (gs://bucket/run). Each worker's output goes to
DIR/worker-<i>.log (default DIR: logs/NAME) and here, prefixed [worker <i>].
--dry-run prints the commands instead of running them."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="" WORKDIR="" TOPOLOGY_FLAG="" MAX_FRACTION=0.9 SKIP_PLAN=0 LOGS=""
OVERRIDES=()
while (($#)); do
  case $1 in
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --topology) need_value "$@"; TOPOLOGY_FLAG=$2; shift 2 ;;
    --max-memory-fraction) need_value "$@"; MAX_FRACTION=$2; shift 2 ;;
    --skip-plan) SKIP_PLAN=1; shift ;;
    --logs) need_value "$@"; LOGS=$2; shift 2 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require --name "$NAME"
require --zone "$ZONE"
require --accelerator-type "$ACCELERATOR"
require --config "$CONFIG"
require --workdir "$WORKDIR"
[[ $MAX_FRACTION =~ ^[0-9]*\.?[0-9]+$ ]] || usage_error "--max-memory-fraction takes a number"
[[ $CONFIG != /* ]] || usage_error "--config: give its path from the repository root"
[[ -f $CONFIG ]] || usage_error "--config $CONFIG: no such file here (run from the repository root)"
accelerator_facts "$ACCELERATOR"
TOPOLOGY=${TOPOLOGY_FLAG:-$TOPOLOGY}
LOGS=${LOGS:-logs/$NAME}

if ((!SKIP_PLAN)); then
  [[ -n $TOPOLOGY ]] || usage_error "no plan topology known for $ACCELERATOR: pass --topology"
  plan_check "$CONFIG" "$TOPOLOGY" "$MAX_FRACTION" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
fi

train_command() {  # what worker $1 runs, from the home directory
  local args=(train --config "$CONFIG" --workdir "$WORKDIR")
  if ((WORKERS > 1)); then
    args+=(--config.distributed.enabled=True "--config.distributed.num_processes=$WORKERS"
      "--config.distributed.process_id=$1")
  fi
  args+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
  printf 'cd %s && PYTHONUNBUFFERED=1 ../%s/bin/mllm-jax %s' "$REMOTE_DIR" "$REMOTE_VENV" \
    "$(shell_words "${args[@]}")"
}

on_worker() { gcloud_tpus tpu-vm ssh "--worker=$1" "--command=$(train_command "$1")"; }

stream_worker() {  # worker $1's output to its log file, and here with a prefix
  local line
  on_worker "$1" 2>&1 | tee "$LOGS/worker-$1.log" |
    while IFS= read -r line; do printf '[worker %s] %s\n' "$1" "$line"; done
}

if ((DRY_RUN)); then
  for ((i = 0; i < WORKERS; i++)); do on_worker "$i"; done
  exit 0
fi
mkdir -p "$LOGS"
# Each worker's pipeline in its own process group: Ctrl-C (or a TERM) here stops them all.
set -m
pids=()
trap 'kill -TERM -- "${pids[@]/#/-}" 2>/dev/null || true; exit 130' INT TERM
for ((i = 0; i < WORKERS; i++)); do
  stream_worker "$i" &
  pids+=($!)
done
status=0
for ((i = 0; i < WORKERS; i++)); do
  wait "${pids[$i]}" || {
    code=$?
    echo "$PROG: worker $i exited with status $code (log: $LOGS/worker-$i.log)" >&2
    ((status)) || status=$code
  }
done
exit "$status"
