#!/usr/bin/env bash
# Evaluate a checkpoint on NGPUS processes per node with torchrun.
#   tools/dist_test.sh CONFIG CHECKPOINT NGPUS [extra args...]
# CONFIG *.yaml -> classification/validate.py, *.py -> tools/test.py (mmengine: detection / segmentation).
# Multi-node options as in dist_train.sh (NNODES, NODE_RANK, MASTER_ADDR, PORT).
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 CONFIG CHECKPOINT NGPUS [args...]" >&2; exit 2; fi
CONFIG=$1
CHECKPOINT=$2
NGPUS=$3
shift 3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
[ -x "$ROOT/.venv/bin/python" ] && PYTHON="$ROOT/.venv/bin/python"
case "$CONFIG" in
  *.yaml|*.yml) SCRIPT="$ROOT/classification/validate.py" ;;
  *.py) SCRIPT="$ROOT/tools/test.py" ;;
  *) echo "unknown config type: $CONFIG (expected .yaml for classification or .py for mmdet/mmseg)" >&2; exit 2 ;;
esac
EXTRA=()
case "$SCRIPT" in */tools/test.py) EXTRA=(--launcher pytorch) ;; esac
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${PORT:-29500}" \
  --nproc_per_node "$NGPUS" \
  "$SCRIPT" "$CONFIG" "$CHECKPOINT" "${EXTRA[@]}" "$@"
