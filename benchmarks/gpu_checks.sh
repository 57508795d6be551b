#!/usr/bin/env bash
# Everything that needs a CUDA device, as one short run (about 5 minutes on one GPU):
#   1. examples/check_fp16_cuda.py  - the fp16 GradScaler path of sam / gam_fast / gam against float32, and the
#                                     skipped step on an injected inf (exit status 1 on a mismatch);
#   2. benchmarks/gpu_step_cost.py  - the step-cost table (ResNet-18, ViT-S/16 at 224 px; bf16, fp16; img/s).
# Results go to benchmarks/results/ (or to $OUT when set, e.g. on a borrowed machine).
#     bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$out/gpu_checks_device.txt"
timeout 240 python examples/check_fp16_cuda.py 2>&1 | tee "$out/check_fp16_cuda.txt"
fp16=${PIPESTATUS[0]}
timeout 420 python benchmarks/gpu_step_cost.py --rounds 5 --out "$out/step_cost_gpu.md" --json "$out/step_cost_gpu.json"
cost=$?
echo "check_fp16_cuda: exit $fp16; gpu_step_cost: exit $cost"
exit $(( fp16 || cost ))
