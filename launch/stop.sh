#!/usr/bin/env bash
# Stops the job on every worker with SIGTERM (the signal of a spot
# preemption or maintenance). Settings: launch/lib.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

on_workers all "pkill -TERM -f 'auditdm_jax.main' || true"
