#!/usr/bin/env bash
# Creates the TPU VM slice (QUEUED=1: through a queued resource, waiting until
# it is ACTIVE). Settings: launch/lib.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mapfile -t spot < <(spot_flag)
if [[ "$QUEUED" == "1" ]]; then
  tpu queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${spot[@]}"
  if [[ "$DRY_RUN" == "1" ]]; then
    tpu queued-resources describe "$TPU_NAME" --format="value(state.state)"
    exit 0
  fi
  while true; do
    state="$(tpu queued-resources describe "$TPU_NAME" --format="value(state.state)")"
    echo "queued resource $TPU_NAME: $state"
    case "$state" in
      ACTIVE) break ;;
      FAILED|SUSPENDED) echo "launch: queued resource $TPU_NAME is $state" >&2; exit 1 ;;
    esac
    sleep 30
  done
else
  tpu tpu-vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" \
    "${spot[@]}"
fi
