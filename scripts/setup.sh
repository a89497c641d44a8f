#!/usr/bin/env bash
# Installs everything ctfs needs on a fresh Debian machine: libfuse3 from apt, the virtual
# environment at .venv/, and ctfs with the extras named in $1 (default: demo).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
ldconfig -p | grep -q 'libfuse3\.so\.3' || need_apt+=(libfuse3-3)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[${extras}]"
