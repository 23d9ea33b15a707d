#!/usr/bin/env bash
# The GPU proof in one command on a fresh GPU machine: a virtualenv with the CUDA build of torch (PyPI's
# default torch is the CUDA one), this project, then the checks and timings with the compiled row.
# The table goes to benchmarks/results/gpu_proof.md; copy it into benchmarks/RESULTS.md.
#   bash benchmarks/gpu_proof.sh [extra gpu_proof flags, e.g. --reps 5]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
fi
. .venv-gpu/bin/activate
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  python -m pip install --quiet --upgrade pip
  pip install --quiet 'torch>=2.5' -e .
fi
python -c 'import torch; assert torch.cuda.is_available(), "no CUDA device seen by torch"'
exec python -m benchmarks.gpu_proof --compile "$@"
