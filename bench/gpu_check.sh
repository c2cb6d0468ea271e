#!/usr/bin/env bash
# One prepared GPU check for an NVIDIA card (H100/H200), under 5 minutes: the Triton selective-scan kernels against
# the sequential reference (the CPU test file, compiled on the GPU), then bench/selective_scan_gpu.py (triton vs torch
# backend timings, achieved bandwidth), a profile of one call (bench/selective_scan_gpu_tune.py) and bench/backbones.py
# on the GPU.
# Usage, from the repository root: bash bench/gpu_check.sh
# Needs torch with CUDA, triton, timm, torchvision, safetensors and pytest (the device image has them); the test
# conftest is skipped because it needs the training stack (lightning CLI, jsonargparse) that the check does not use.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
echo "== $(date -u +%Y-%m-%dT%H:%MZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

echo "== correctness: tests/ops/test_selective_scan_triton.py on the GPU"
python3 -m pytest -q --noconftest -p no:cacheprovider tests/ops/test_selective_scan_triton.py -m "slow or not slow" \
    || status=1

echo "== benchmark: bench/selective_scan_gpu.py"
python3 bench/selective_scan_gpu.py --repeats "${REPEATS:-20}" || status=1
echo "== where the time of one call goes: bench/selective_scan_gpu_tune.py --no-sweep (the sweep: drop --no-sweep)"
python3 bench/selective_scan_gpu_tune.py --no-sweep --shapes stage1,stage3 2>&1 | grep -v "^USDT\|^ERROR\|UserWarning" \
    || status=1
echo "== VMamba-T training throughput: triton vs torch scan, DeiT-S alongside (informational)"
python3 bench/backbones.py --device cuda --batch 64 --iters 10 --warmup 3 --scan-backend triton,torch || status=1
echo "== gpu_check exit status: $status"
exit $status
