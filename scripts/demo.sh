#!/usr/bin/env bash
# Installs everything, then runs the built-in demo: a tiny Llama-style model made locally,
# encrypted, mounted with ctfs, loaded through the mount with transformers, unmounted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/python -m demo "${@}"
