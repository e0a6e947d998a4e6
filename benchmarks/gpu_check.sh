#!/usr/bin/env bash
# GPU readiness check (issue 18.8), for a machine with a CUDA device; < 8 minutes on one GPU.
#   1. the CUDA cases of the test suite (every test taking the `device` fixture runs on cuda too),
#      plus the tests that exercise device moves;
#   2. the kernel grid on the GPU (dense vs bondgate vs other MPO kernels), results in
#      benchmarks/results/kernel_cuda.{json,md,png}.
# Usage: bash benchmarks/gpu_check.sh   (from a clone with the project installed: pip install -e ".[dev]")
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
assert torch.cuda.is_available(), "benchmarks/gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False)"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
PY
start=$(date +%s)
timeout 300 python -m pytest -q -p no:cacheprovider -k "cuda or device" tests/
timeout 200 python benchmarks/kernel.py --device cuda --rounds 3 --min-time 0.02
echo "gpu_check: done in $(( $(date +%s) - start )) s"
