#!/usr/bin/env bash
# Shared settings and helpers of the launch scripts; sourced, never run.
#
# Settings (environment variables):
#   TPU_NAME      the TPU VM (and queued resource) name              (required)
#   ZONE          e.g. us-east5-a                                     (required)
#   PROJECT       GCP project (default: gcloud's configured project)
#   ACCELERATOR   slice type, e.g. v5p-32, v6e-64, v5litepod-16       (default v5p-32)
#   RUNTIME       TPU software version (default: from ACCELERATOR's generation)
#   QUEUED=1      go through a queued resource (capacity waits in a queue)
#   SPOT=1        spot capacity (preemptible; the run resumes from its checkpoints)
#   CONFIG        config inside the repo, with its argument
#                 (default configs/audit_paligemma2.py:size=3b,res=448)
#   LOCAL_CONFIG  a config file on this machine to copy to every worker's configs/
#   BUCKET        a Cloud Storage bucket (name, no gs://) that install.sh mounts with
#                 gcsfuse at /gcs/$BUCKET on every worker: the shared workdir a
#                 multi-host slice needs (every host reads what process 0 writes)
#   WORKDIR       the run's workdir on the workers (default /gcs/$BUCKET/auditdm/$TPU_NAME
#                 with BUCKET, else $HOME/auditdm_work: enough for a one-host slice only)
#   EXTRA_ENV     extra VAR=value words for the job's environment
#   DRY_RUN=1     print every gcloud command (shell-quoted, one per line) instead of running it
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME (the TPU VM name), e.g. TPU_NAME=auditdm-v5p}"
: "${ZONE:?set ZONE (the TPU zone), e.g. ZONE=us-east5-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-v5p-32}"
QUEUED="${QUEUED:-0}"
SPOT="${SPOT:-0}"
CONFIG="${CONFIG:-configs/audit_paligemma2.py:size=3b,res=448}"
LOCAL_CONFIG="${LOCAL_CONFIG:-}"
# Expanded on the workers (single quotes keep $HOME for their shell).
BUCKET="${BUCKET:-}"
BUCKET="${BUCKET#gs://}"
BUCKET="${BUCKET%%/*}"
# shellcheck disable=SC2034
MOUNT="/gcs/$BUCKET"
WORKDIR="${WORKDIR:-}"
if [[ -z "$WORKDIR" && -n "$BUCKET" ]]; then
  WORKDIR="$MOUNT/auditdm/$TPU_NAME"
elif [[ -z "$WORKDIR" ]]; then
  # shellcheck disable=SC2016
  WORKDIR='$HOME/auditdm_work'
fi
EXTRA_ENV="${EXTRA_ENV:-}"
DRY_RUN="${DRY_RUN:-0}"
# Used by the scripts that source this file (under the workers' home directories):
# shellcheck disable=SC2034
REMOTE_REPO="auditdm_jax"
# shellcheck disable=SC2034
LOG_FILE="auditdm_main.log"

default_runtime() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v4-*) echo "tpu-ubuntu2204-base" ;;
    *) echo "launch: no default runtime for ACCELERATOR=$1; set RUNTIME" >&2; return 1 ;;
  esac
}
RUNTIME="${RUNTIME:-$(default_runtime "$ACCELERATOR")}"

# run CMD...: runs it, or prints it shell-quoted under DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# tpu ARGS...: `gcloud compute tpus ARGS --zone=... [--project=...]`.
tpu() {
  local extra=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    extra+=(--project="$PROJECT")
  fi
  run gcloud compute tpus "$@" "${extra[@]}"
}

# on_workers WORKER COMMAND: runs a shell command on worker WORKER ("all" or an index).
on_workers() {
  tpu tpu-vm ssh "$TPU_NAME" --worker="$1" --command="$2"
}

spot_flag() {
  if [[ "$SPOT" == "1" ]]; then
    echo "--spot"
  fi
}
