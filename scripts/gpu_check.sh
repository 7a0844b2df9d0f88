#!/usr/bin/env bash
# One-command check of the CUDA paths, for a machine with an NVIDIA GPU:
#   bash scripts/gpu_check.sh               # makes .venv-gpu (torch's default CUDA wheel, faiss-gpu)
#   bash scripts/gpu_check.sh --no-install  # uses the python3 on PATH as it is (torch with CUDA,
#                                           # faiss and the package importable, e.g. PYTHONPATH)
# Runs the tests that need CUDA (they skip everywhere else), times graph build + diffusion and
# spectral propagation on the GPU beside the CPU on the same data, then the README's main job on
# the GPU (needs Fashion-MNIST: Debian's package or <FSBENCH_DATA>/fashion-mnist/).
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
step() { # run one check; a failure is reported at the end and does not stop the others
  echo "== $*"
  local t0=$SECONDS
  "$@" || failed+=("$*")
  echo "== $((SECONDS - t0)) s wall: $1 ${2:-} ${3:-}"
}
if [ "${1:-}" != "--no-install" ]; then
  set -e
  python3 -m venv .venv-gpu
  . .venv-gpu/bin/activate
  python -m pip install -q --upgrade pip
  python -m pip install -q torch # the default wheel: a CUDA build
  python -m pip install -q -e ".[gpu,test]"
  set +e
fi
export PYTHONUNBUFFERED=1
fsbench() { python3 -m fewshot_bench "$@"; }
python3 - <<'PY' || exit 1
import faiss, torch
assert torch.cuda.is_available(), "torch sees no CUDA device: check the driver and the torch build"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| faiss",
      faiss.__version__, "| faiss GPUs:", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
PY
step python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
  tests/test_graph_knn.py::test_gpu_search_matches_cpu \
  tests/test_propagation_methods.py::test_gpu_matches_cpu
fm=()
if [ -n "${FSBENCH_DATA:-}" ] && [ -d "$FSBENCH_DATA/fashion-mnist" ]; then
  fm=(--data-root "$FSBENCH_DATA/fashion-mnist")
fi
for device in cuda cpu; do
  step fsbench perf propagation --n 100000 --device "$device" --no-sklearn "${fm[@]}"
  step fsbench perf propagation --n 50000 --dim 128 --method spectral --device "$device" --no-sklearn \
    "${fm[@]}"
done
step fsbench perf propagation --data synthetic --n 1000000 --device cuda --no-sklearn
work=$(mktemp -d)
step fsbench run fashion-mnist-ssl -m nearest-prototype -m logistic-regression \
  -m propagation-classifier -m diffusion --device cuda --workdir "$work" --quiet
step fsbench report --workdir "$work"
step fsbench run fashion-mnist-ssl-250 -m supervised -m mean-teacher --seeds 0 --device cuda \
  --workdir "$work" --quiet
step fsbench report --protocol fashion-mnist-ssl-250 --workdir "$work"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all GPU checks passed"
