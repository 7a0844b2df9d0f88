#!/usr/bin/env bash
# One-command check of the CUDA paths, for a machine with an NVIDIA GPU:
#   bash scripts/gpu_check.sh
# Installs the package with faiss's GPU build into .venv-gpu, runs the tests that need CUDA
# (they skip everywhere else), then times graph build + diffusion on the GPU beside the CPU on
# the same synthetic data (no dataset needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch            # the default wheel: a CUDA build
python -m pip install -q -e ".[gpu,test]"
python - <<'PY'
import faiss, torch
assert torch.cuda.is_available(), "torch sees no CUDA device: check the driver and the torch build"
print("GPU:", torch.cuda.get_device_name(0), "| faiss GPUs:", faiss.get_num_gpus())
PY
python -m pytest -q -rs tests/test_graph_knn.py tests/test_propagation_methods.py tests/test_cli_errors.py
for device in cuda cpu; do
  fsbench perf propagation --data synthetic --n 200000 --dim 64 --device "$device" --no-sklearn
done
