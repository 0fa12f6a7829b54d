#!/usr/bin/env bash
# The prepared GPU check (at most 8 minutes on one H100/H200), from a plain checkout:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the CUDA tests (if pytest is installed there), 2. benchmarks/gpu_check.py: VGG16 at 224,
# batch 64 -- forward, fits with float32 and TF32 products and their error, the
# positive-only fit, every explanation method, layer quality for all 16 layers; one JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
mkdir -p "$out"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
if python -c "import pytest" 2>/dev/null; then
  timeout 150 python -m pytest -o addopts="" -p no:cacheprovider -q -k cuda \
    tests/test_precision.py tests/test_methods.py tests/test_streaming.py 2>&1 | tail -15 | tee "$out/cuda_tests.txt"
else
  echo "pytest is not installed here: CUDA tests not run" | tee "$out/cuda_tests.txt"
fi
timeout 330 python benchmarks/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tail -40
