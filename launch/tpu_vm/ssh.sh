#!/usr/bin/env bash
# Opens a shell on one worker of a TPU VM, or runs a command there.
set -euo pipefail
USAGE="usage: $(basename "$0") --name NAME --zone ZONE [--project P] [--worker I|all]
       [--dry-run] [-- COMMAND...]

Logs in to worker I (default 0) of TPU VM NAME; with a COMMAND after --, runs it there
instead (--worker all: on every worker). The code is in ~/mllm_jax and its Python in
~/mllm_jax-venv (setup.sh). --dry-run prints the gcloud command instead of running it."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
COMMAND=()
while (($#)); do
  case $1 in
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --) shift; COMMAND=("$@"); break ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require --name "$NAME"
require --zone "$ZONE"
[[ $WORKER =~ ^([0-9]+|all)$ ]] || usage_error "--worker takes a number or 'all'"

if ((${#COMMAND[@]})); then
  gcloud_tpus tpu-vm ssh "--worker=$WORKER" "--command=${COMMAND[*]}"
else
  gcloud_tpus tpu-vm ssh "--worker=$WORKER"
fi
