#!/usr/bin/env bash
# Streams the job's log from one worker (WORKER, default 0: the process that
# writes reports and logs). Settings: launch/lib.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

on_workers "${WORKER:-0}" "tail -n +1 -F ~/$LOG_FILE"
