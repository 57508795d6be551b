#!/usr/bin/env bash
# Everything that needs a CUDA device, as one short run (about 5 minutes on one GPU):
#   1. examples/check_fp16_cuda.py  - the fp16 GradScaler path of sam / gam_fast / gam against float32, and the
#                                     skipped step on an injected inf (exit status 1 on a mismatch);
#   2. benchmarks/gpu_step_cost.py  - the step-cost table (ResNet-18, ViT-S/16 at 224 px; bf16, fp16; img/s);
#   3. tests/test_fsdp_trainer.py   - GAMTrainer under accelerate's FSDP2 on 1 GPU (a 1-process mesh; sam and
#                                     gam_fast against a plain run; about 1 minute).
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
timeout 300 python -m pytest tests/test_fsdp_trainer.py -m slow -k cuda -q -p no:cacheprovider 2>&1 \
    | tee "$out/fsdp2_trainer_cuda.txt"
fsdp=${PIPESTATUS[0]}
echo "check_fp16_cuda: exit $fp16; gpu_step_cost: exit $cost; fsdp2 trainer: exit $fsdp"
exit $(( fp16 || cost || fsdp ))
