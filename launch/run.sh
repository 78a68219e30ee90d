#!/usr/bin/env bash
# Starts `python -m auditdm_jax.main --distributed` on every worker (one JAX
# process per host; jax.distributed finds the others through the TPU
# metadata), detached, logging to
# ~/auditdm_main.log on each worker. Settings: launch/lib.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

job="cd ~/$REMOTE_REPO && nohup env PYTHONUNBUFFERED=1${EXTRA_ENV:+ $EXTRA_ENV} python3 -m auditdm_jax.main --distributed --config=$CONFIG --workdir=$WORKDIR > ~/$LOG_FILE 2>&1 < /dev/null &"
on_workers all "$job"
