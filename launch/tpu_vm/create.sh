#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice: on demand, spot, or as a queued resource.
set -euo pipefail
USAGE="usage: $(basename "$0") --name NAME --zone ZONE --accelerator-type TYPE [--project P]
       [--spot] [--queued [--valid-until-duration D]] [--runtime-version V] [--dry-run]

Creates TPU VM NAME (v4-N, v5p-N, v5litepod-N or v6e-N). --spot: a spot VM (cheaper,
preemptible). --queued: a queued resource of the same name that waits for capacity (with
--spot: for spot capacity); --valid-until-duration (e.g. 6h) drops the request if not
granted by then. --runtime-version overrides the TPU software version picked for the
generation (v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
v6e: v2-alpha-tpuv6e). --dry-run prints the gcloud command instead of running it."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SPOT=0 QUEUED=0 VALID_UNTIL="" RUNTIME=""
while (($#)); do
  case $1 in
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --valid-until-duration) need_value "$@"; VALID_UNTIL=$2; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME=$2; shift 2 ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require --name "$NAME"
require --zone "$ZONE"
require --accelerator-type "$ACCELERATOR"
[[ -z $VALID_UNTIL || $QUEUED == 1 ]] || usage_error "--valid-until-duration needs --queued"
accelerator_facts "$ACCELERATOR"
RUNTIME=${RUNTIME:-$RUNTIME_VERSION}

spot=()
((SPOT)) && spot=(--spot)
if ((QUEUED)); then
  gcloud_tpus queued-resources create "--node-id=$NAME" "--accelerator-type=$ACCELERATOR" \
    "--runtime-version=$RUNTIME" ${spot[@]+"${spot[@]}"} \
    ${VALID_UNTIL:+"--valid-until-duration=$VALID_UNTIL"}
  ((DRY_RUN)) || echo "$PROG: queued; the VM exists once this says ACTIVE:" \
    "gcloud compute tpus queued-resources describe $NAME --zone=$ZONE" >&2
else
  gcloud_tpus tpu-vm create "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME" \
    ${spot[@]+"${spot[@]}"}
fi
