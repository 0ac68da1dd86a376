#!/usr/bin/env bash
# Sends this repository's code to every worker of a TPU VM and installs it there.
set -euo pipefail
USAGE="usage: $(basename "$0") --name NAME --zone ZONE [--project P] [--sync-only]
       [--python PYTHON] [--dry-run]

Packs the committed tree (git archive HEAD: commit what the workers should run), copies
it to every worker of TPU VM NAME and unpacks it into ~/mllm_jax, replacing the last copy;
then installs it with its TPU extra (jax[tpu]) into the virtualenv ~/mllm_jax-venv, made
with PYTHON (default python3.11; jax needs 3.11 or later; installed with apt if missing).
--sync-only: only replace the code (enough unless setup.py changed). --dry-run prints the
commands instead of running them."
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SYNC_ONLY=0 PYTHON=python3.11
while (($#)); do
  case $1 in
    --sync-only) SYNC_ONLY=1; shift ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done
require --name "$NAME"
require --zone "$ZONE"

ARCHIVE=${TMPDIR:-/tmp}/mllm_jax-$NAME.tar.gz
if ((!DRY_RUN)) && [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
  echo "$PROG: uncommitted changes are not sent (git archive HEAD)" >&2
fi
run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$ARCHIVE" HEAD

remote="set -e; rm -rf $REMOTE_DIR; mkdir $REMOTE_DIR; tar -xzf mllm_jax.tar.gz -C $REMOTE_DIR"
if ((!SYNC_ONLY)); then
  pip="$REMOTE_VENV/bin/pip install -q"
  remote+="; if ! $PYTHON -m venv $REMOTE_VENV; then sudo apt-get update -q"
  remote+=" && sudo apt-get install -y -q $PYTHON $PYTHON-venv && $PYTHON -m venv $REMOTE_VENV; fi"
  remote+="; $pip -U pip; $pip -e './${REMOTE_DIR}[tpu]'"
fi
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:mllm_jax.tar.gz" "--zone=$ZONE" \
  --worker=all ${PROJECT:+"--project=$PROJECT"}
gcloud_tpus tpu-vm ssh --worker=all "--command=$remote"
