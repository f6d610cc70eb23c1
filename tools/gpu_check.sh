#!/usr/bin/env bash
# The GPU checks as one script, for a short lease on a lent machine: correctness first, then the figures.
# Each step has its own time limit and a failed step does not stop the next; everything lands in $OUT
# (log.txt and the benchmark JSON files). About 8 minutes on an H100.
#
#   OUT=gpu_out bash tools/gpu_check.sh            # python3 with torch, triton and timm; no mmcv needed
set -u
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
step() {
    local limit=$1 t0=$SECONDS
    shift
    echo "== $* (limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$LOG"
}

step 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
step 60 "$PY" -c "import torch, triton, timm; print(torch.__version__, triton.__version__, timm.__version__)"
# 1. correctness: the kernels against the definition, a CUDA training step three ways, the lean functions
PYTEST_ARGS=(-q -p no:cacheprovider -ra)
"$PY" -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n 6)
step 240 "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/test_triton.py tests/test_ops.py tests/test_lean.py
# 2. the aggregation operator: Triton kernels, then the PyTorch formulation, each against the unfold formulation
BENCH=("$PY" tools/benchmark.py --device cuda --warmup 3 --iters 10)
step 120 "${BENCH[@]}" --ops --json "$OUT/ops_triton.json"
OVERLOCK_TRITON=0 step 60 "${BENCH[@]}" --ops --op-shapes 'stage3@224 K13' 'stage3@800x1280 K13' \
    --json "$OUT/ops_pytorch.json"
# 3. models (a worker process takes ~15 s to start there): the settings (batch 8, fp32; also paired in one
#    process) and a dense step
step 180 "${BENCH[@]}" --repeats 1 --paired 20 --models overlock_t convnext_tiny --json "$OUT/models_224_b8.json"
step 90 "${BENCH[@]}" --repeats 1 --batch 1 --size 800 1280 --modes train --backbone \
    --models overlock_t convnext_tiny --json "$OUT/dense_800x1280.json"
# 4. where a dense training step of OverLoCK-T spends its GPU time
step 60 "${BENCH[@]}" --repeats 1 --batch 1 --size 800 1280 --modes train --backbone --models overlock_t \
    --profile 25 --json "$OUT/profile_800x1280.json"
# 5. with COMPILE=1: both models through torch.compile (compiling OverLoCK-T's training graph took 26 min on the
#    2-core CPU; unmeasured on a GPU host, hence opt-in)
if [ "${COMPILE:-0}" = 1 ]; then
    step 540 "${BENCH[@]}" --repeats 1 --compile --models overlock_t convnext_tiny --json "$OUT/models_224_b8_compiled.json"
fi
