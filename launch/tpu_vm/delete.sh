#!/usr/bin/env bash
# Deletes a TPU VM, or a queued resource together with its VM.
set -euo pipefail
USAGE="usage: $(basename "$0") --name NAME --zone ZONE [--project P] [--queued] [--dry-run]

Deletes TPU VM NAME without asking. --queued: NAME is a queued resource (create.sh
--queued); it is deleted with --force, which deletes its VM too. --dry-run prints the
gcloud command instead of running it."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
while (($#)); do
  case $1 in
    --queued) QUEUED=1; shift ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require --name "$NAME"
require --zone "$ZONE"

if ((QUEUED)); then
  gcloud_tpus queued-resources delete --force --quiet
else
  gcloud_tpus tpu-vm delete --quiet
fi
