#!/usr/bin/env bash
# GPU check from a fresh checkout on a machine with a CUDA GPU (target: under 5 minutes in all):
#   1. installs featx into .venv-gpu (a CUDA torch already on the machine is kept, else the pinned one is installed)
#   2. runs the tests marked `cuda` (they skip on machines without CUDA)
#   3. runs benchmarks/gpu_check.py: ResNet-50 img/s of `featx extract` end to end (CPU decoding and --decode gpu)
#      against the pure forward at batch 256, and CPU-vs-GPU embedding agreement
# Usage: bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --images 8192]
#        PYTHON=/path/to/python bash benchmarks/gpu_check.sh    (use an environment that has featx installed)
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
if [ -z "${PYTHON:-}" ]; then
  python3 -m venv --system-site-packages .venv-gpu
  PYTHON=.venv-gpu/bin/python
  if "$PYTHON" -c "import sys, torch, torchvision; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    # keep the machine's CUDA torch; with no package index (an offline GPU machine) featx alone goes in, on the
    # packages already there, and tests of extras that are missing skip
    "$PYTHON" -m pip install -q --retries 0 --timeout 5 -e ".[dev]" 2>/dev/null \
      || { echo "gpu_check: no package index, installing featx alone on the installed packages"
           "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .; }
  else
    "$PYTHON" -m pip install -q -c constraints.txt -e ".[dev]"
  fi
fi
"$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" \
  || { echo "gpu_check: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no CUDA device" >&2; exit 1; }
echo "== tests marked cuda"
tests=0
"$PYTHON" -m pytest -q -m cuda || tests=$?   # the measurements still run, and the exit status says the tests failed
echo "== throughput and agreement"
"$PYTHON" benchmarks/gpu_check.py "$@"
echo "gpu_check: done in $(( $(date +%s) - started )) s"
exit "$tests"
