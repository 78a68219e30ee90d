#!/usr/bin/env bash
# Deletes the slice (and its queued resource with QUEUED=1). Settings: launch/lib.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ "$QUEUED" == "1" ]]; then
  tpu queued-resources delete "$TPU_NAME" --force --quiet
else
  tpu tpu-vm delete "$TPU_NAME" --quiet
fi
