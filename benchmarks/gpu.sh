#!/usr/bin/env bash
# Everything we check and measure on a CUDA GPU, in one go (the CPU runs are each benchmark's own command):
#   1. tests/test_cuda.py: CUDA agrees with the CPU, bf16 training works, saves load across devices
#   2. the speed benchmarks with --device cuda (bf16 autocast), written as benchmarks/results/*_cuda.json
#   3. the demo on the GPU, for a short budget
#
#   bash benchmarks/gpu.sh [DEMO_MINUTES] [OUT]     # defaults: 1.5 minutes (0: no demo), demo_out_cuda
#
# Each step has a time limit (sampling on an H200 outran 170 s; 420 s should hold it) and a failed step
# does not stop the later ones; the exit status is the number of steps that failed.
set -u
DEMO_MINUTES=${1:-1.5}
OUT=${2:-demo_out_cuda}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
failed=0

step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - start)) s"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step 120 "CUDA tests" $PYTHON -m pytest -q -p no:cacheprovider tests/test_cuda.py
step 300 "vs_diffusers" $PYTHON -m benchmarks.vs_diffusers --device cuda
step 420 "sampling" $PYTHON -m benchmarks.sampling --device cuda
step 60 "resolution, batch 8" $PYTHON -m benchmarks.resolution --device cuda
step 90 "resolution, batch 64" $PYTHON -m benchmarks.resolution --device cuda --batch-size 64
if [ "$DEMO_MINUTES" != 0 ]; then
    step 240 "demo" $PYTHON -m minildm demo --device cuda --minutes "$DEMO_MINUTES" --out "$OUT"
fi
echo "=== $failed step(s) failed"
exit "$failed"
