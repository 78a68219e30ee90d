#!/usr/bin/env bash
# Installs the Debian packages some tests need: chromium (the report's
# browser test, tests/test_report.py) and shellcheck (the launch scripts,
# tests/test_launch.py). Does nothing for a tool already on PATH.
set -euo pipefail

declare -A PACKAGE_OF=([chromium]=chromium [shellcheck]=shellcheck)
missing=()
for tool in "${!PACKAGE_OF[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$tool]}")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps.sh: apt-get not found; install Debian's ${missing[*]} by hand" >&2
  exit 1
fi
SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install_system_deps.sh: not root and sudo not found; run as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
for tool in "${!PACKAGE_OF[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "install_system_deps.sh: $tool still not on PATH after installing" >&2
    exit 1
  }
done
