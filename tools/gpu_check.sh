#!/usr/bin/env bash
# The GPU checks as one script, to run in one go on a CUDA machine (e.g. H100/H200): correctness first, then the
# figures. Each step has its own time limit (together under 10 minutes) and a failed step does not stop the next;
# everything lands in $OUT (log.txt and the benchmark JSON files).
#
#   OUT=gpu_out bash tools/gpu_check.sh            # python3 with torch, triton and timm; no mmcv needed
# Opt-in extra steps (each adds a few minutes; run them separately if your GPU time is limited):
#   WITH_TRITON=1  the bf16 realistic figures again with the Triton depth-wise kernels forced on
#   LEAN=1         the bf16 realistic figures again with the accelerated modules (overlock_core.accel, lean=True);
#                  with WITH_TRITON=1 also the lean form with the Triton kernels and the DilatedReparamBlocks'
#                  branches in one launch per pass (KERNELS.triton_drb)
#   PROFILE=1      OverLoCK-T's dense training step profiled, per operator kind (depth-wise conv, conv, matmul, ...)
#   COMPILE=1      both models through torch.compile
set -u
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset OVERLOCK_TRITON_DWCONV OVERLOCK_TRITON_DRB  # cuDNN unless a step asks for the Triton kernels
LOG=$OUT/log.txt
step() {
    local limit=$1 t0=$SECONDS
    shift
    echo "== $* (limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$LOG"
}

step 15 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
step 30 "$PY" -c "import torch, triton, timm; print(torch.__version__, triton.__version__, timm.__version__)"
# 1. correctness: the Triton depth-wise kernels against cuDNN (forward, both gradients, fp32/fp16/bf16, both
#    layouts, dispatch through dw_conv2d, a training step), then the aggregation kernels
PYTEST_ARGS=(-q -p no:cacheprovider -ra)
"$PY" -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n 6)
step 150 "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/test_triton_depthwise.py -k cuda
step 90 "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/test_triton.py
# 2. the realistic figures: overlock_t (the paper form, as the launchers run it on GPUs) vs convnext_tiny, fp16 and
#    bf16 autocast, channels-last, AdamW steps: training and inference at 224 (batch 128) and a dense backbone
#    training step at 800x1333 (batch 2)
BENCH=("$PY" tools/benchmark.py --device cuda)
step 190 "${BENCH[@]}" --realistic --repeats 1 --warmup 1 --iters 3 --json "$OUT/realistic.json"
# 3. every depth-wise conv shape of OverLoCK-T at those inputs, and each stage's DilatedReparamBlock branches
#    together, cuDNN against Triton: the triton_dwconv.MEASURED and MEASURED_DRB entries (the kernels are compiled
#    first in parallel processes)
step 110 "${BENCH[@]}" --ops dwconv --warmup 2 --iters 5 --json "$OUT/dwconv_ops.json"
# 4. opt-in: the bf16 figures with the Triton depth-wise kernels forced on; where a dense step's time goes;
#    torch.compile
if [ "${WITH_TRITON:-0}" = 1 ]; then
    OVERLOCK_TRITON_DWCONV=1 step 150 "${BENCH[@]}" --realistic --precisions bf16 --repeats 1 --warmup 1 --iters 3 \
        --json "$OUT/realistic_triton_bf16.json"
fi
if [ "${LEAN:-0}" = 1 ]; then
    step 150 "${BENCH[@]}" --realistic --lean --precisions bf16 --repeats 1 --warmup 1 --iters 3 \
        --json "$OUT/realistic_lean_bf16.json"
    if [ "${WITH_TRITON:-0}" = 1 ]; then
        OVERLOCK_TRITON_DWCONV=1 OVERLOCK_TRITON_DRB=1 step 150 "${BENCH[@]}" --realistic --lean --precisions bf16 \
            --repeats 1 --warmup 1 --iters 3 --json "$OUT/realistic_lean_triton_bf16.json"
    fi
fi
if [ "${PROFILE:-0}" = 1 ]; then
    step 90 "${BENCH[@]}" --repeats 1 --warmup 1 --iters 3 --batch 2 --size 800 1333 --modes train --backbone \
        --dtype bf16 --channels-last --models overlock_t --profile 25 --json "$OUT/profile_800x1333.json"
fi
if [ "${COMPILE:-0}" = 1 ]; then
    step 540 "${BENCH[@]}" --repeats 1 --compile --models overlock_t convnext_tiny --json "$OUT/models_224_b8_compiled.json"
fi
