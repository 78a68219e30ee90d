#!/usr/bin/env bash
# From zero to a running audit: create -> install -> run -> logs.
# Settings: launch/lib.sh. Stop with launch/stop.sh, clean up with launch/delete.sh.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
bash "$here/create.sh"
bash "$here/install.sh"
bash "$here/run.sh"
bash "$here/logs.sh"
