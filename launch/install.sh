#!/usr/bin/env bash
# Copies this checkout (git HEAD, plus LOCAL_CONFIG) to every worker and
# installs it there with the TPU extras. Settings: launch/lib.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tarball="${TMPDIR:-/tmp}/auditdm_jax-$TPU_NAME.tar.gz"
run git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
tpu tpu-vm scp "$tarball" "$TPU_NAME:auditdm_jax.tar.gz" --worker=all
on_workers all "mkdir -p ~/$REMOTE_REPO && tar -xzf ~/auditdm_jax.tar.gz -C ~/$REMOTE_REPO && cd ~/$REMOTE_REPO && python3 -m pip install -q -e '.[tpu]'"
if [[ -n "$LOCAL_CONFIG" ]]; then
  tpu tpu-vm scp "$LOCAL_CONFIG" "$TPU_NAME:$REMOTE_REPO/configs/$(basename "$LOCAL_CONFIG")" \
    --worker=all
fi
