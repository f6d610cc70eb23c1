#!/usr/bin/env bash
# The GPU checks, in parts, to run on a CUDA machine (e.g. H100/H200): correctness first, then the figures. Each
# step has its own time limit and a failed step does not stop the next; everything lands in $OUT (log.txt and the
# benchmark JSON files). python3 with torch, triton and timm; no mmcv needed.
#
#   OUT=gpu_out bash tools/gpu_check.sh [PART ...]      (no PART: check figures, under 6.5 minutes)
#
#   check        the Triton depth-wise kernels against cuDNN (forward, both gradients, fp32/fp16/bf16, both
#                layouts, the dispatch through dw_conv2d, training steps), then the aggregation kernels
#   figures      the realistic table: overlock_t (the paper form, as the launchers run it on GPUs) against
#                convnext_tiny, fp16 and bf16 autocast, channels-last, AdamW steps: training and inference at 224
#                (batch 128) and a dense backbone training step at 800x1333 (batch 2)
#   table        every depth-wise conv shape of OverLoCK-T at those inputs, and each stage's DilatedReparamBlock
#                branches together, cuDNN against Triton: the triton_dwconv.MEASURED and MEASURED_DRB entries
#   triton       the bf16 figures with the Triton depth-wise kernels forced on
#   lean         the bf16 figures with the accelerated modules (overlock_core.accel, lean=True)
#   lean-triton  the same with the Triton kernels and the DilatedReparamBlocks' branches in one launch per pass
#   profile      OverLoCK-T's dense training step profiled, per operator kind (depth-wise conv, conv, matmul, ...)
#   compile      both models through torch.compile
#
# On a lent machine with little time: the default first, then `table triton` in a second call.
set -u
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset OVERLOCK_TRITON_DWCONV OVERLOCK_TRITON_DRB  # cuDNN unless a part asks for the Triton kernels
LOG=$OUT/log.txt
declare -A LIMIT=([check]=150 [figures]=190 [table]=110 [triton]=150 [lean]=150 [lean-triton]=150 [profile]=90
                  [compile]=540)
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(check figures)
total=45
for part in "${PARTS[@]}"; do
    [ -n "${LIMIT[$part]+x}" ] || { echo "gpu_check.sh: unknown part '$part'; parts: ${!LIMIT[*]}" >&2; exit 2; }
    total=$((total + LIMIT[$part]))
done
echo "== parts: ${PARTS[*]} (at most ${total} s)" | tee -a "$LOG"

step() {
    local limit=$1 t0=$SECONDS
    shift
    echo "== $* (limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$LOG"
}

step 15 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
step 30 "$PY" -c "import torch, triton, timm; print(torch.__version__, triton.__version__, timm.__version__)"
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -ra)
"$PY" -c "import xdist" 2>/dev/null && PYTEST+=(-n 6)
BENCH=("$PY" tools/benchmark.py --device cuda)
REALISTIC=(--realistic --repeats 1 --warmup 1 --iters 3)
BF16=("${REALISTIC[@]}" --precisions bf16)
for part in "${PARTS[@]}"; do
    limit=${LIMIT[$part]}
    case $part in
        check) step "$limit" "${PYTEST[@]}" tests/test_triton_depthwise.py tests/test_triton.py -k cuda ;;
        figures) step "$limit" "${BENCH[@]}" "${REALISTIC[@]}" --json "$OUT/realistic.json" ;;
        table) step "$limit" "${BENCH[@]}" --ops dwconv --warmup 2 --iters 5 --json "$OUT/dwconv_ops.json" ;;
        triton) OVERLOCK_TRITON_DWCONV=1 step "$limit" "${BENCH[@]}" "${BF16[@]}" \
            --json "$OUT/realistic_triton_bf16.json" ;;
        lean) step "$limit" "${BENCH[@]}" "${BF16[@]}" --lean --json "$OUT/realistic_lean_bf16.json" ;;
        lean-triton) OVERLOCK_TRITON_DWCONV=1 OVERLOCK_TRITON_DRB=1 step "$limit" "${BENCH[@]}" "${BF16[@]}" --lean \
            --json "$OUT/realistic_lean_triton_bf16.json" ;;
        profile) step "$limit" "${BENCH[@]}" --repeats 1 --warmup 1 --iters 3 --batch 2 --size 800 1333 \
            --modes train --backbone --dtype bf16 --channels-last --models overlock_t --profile 25 \
            --json "$OUT/profile_800x1333.json" ;;
        compile) step "$limit" "${BENCH[@]}" --repeats 1 --compile --models overlock_t convnext_tiny \
            --json "$OUT/models_224_b8_compiled.json" ;;
    esac
done
