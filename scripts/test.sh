#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (real FUSE mounts included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "${@}"
