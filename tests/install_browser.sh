#!/usr/bin/env bash
# Installs Debian's chromium for the report's browser test
# (tests/test_report.py); does nothing when `chromium` is already on PATH.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser.sh: apt-get not found; install Debian's chromium package by hand" >&2
  exit 1
fi
SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install_browser.sh: not root and sudo not found; run as root: apt-get install chromium" >&2
    exit 1
  fi
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium; then
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium
fi
command -v chromium >/dev/null 2>&1 || {
  echo "install_browser.sh: chromium still not on PATH after installing" >&2
  exit 1
}
