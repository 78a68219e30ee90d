#!/usr/bin/env bash
# Copies this checkout (git HEAD, plus LOCAL_CONFIG) to every worker and
# installs it there with the TPU extras; with BUCKET, installs gcsfuse and
# mounts the bucket at /gcs/$BUCKET on every worker (the shared workdir).
# Settings: launch/lib.sh.
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
if [[ -n "$BUCKET" ]]; then
  # gcsfuse from Google's apt repository, then the mount (kept if already there).
  on_workers all "if ! command -v gcsfuse >/dev/null; then \
echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
| sudo gpg --dearmor -o /etc/apt/trusted.gpg.d/gcsfuse.gpg --yes && \
sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi && \
sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT && \
(mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT)"
fi
