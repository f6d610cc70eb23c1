#!/usr/bin/env bash
# Launch training on NGPUS processes per node with torchrun.
#   tools/dist_train.sh CONFIG NGPUS [extra args...]
# CONFIG *.yaml -> classification/train.py, *.py -> tools/train.py (mmengine: detection / segmentation).
# Multi-node: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 PORT=29500 tools/dist_train.sh CONFIG 8
# On a CPU-only machine NGPUS is the number of processes (gloo backend).
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 CONFIG NGPUS [args...]" >&2; exit 2; fi
CONFIG=$1
NGPUS=$2
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
[ -x "$ROOT/.venv/bin/python" ] && PYTHON="$ROOT/.venv/bin/python"
case "$CONFIG" in
  *.yaml|*.yml) SCRIPT="$ROOT/classification/train.py" ;;
  *.py) SCRIPT="$ROOT/tools/train.py" ;;
  *) echo "unknown config type: $CONFIG (expected .yaml for classification or .py for mmdet/mmseg)" >&2; exit 2 ;;
esac
EXTRA=()
case "$SCRIPT" in */tools/train.py) EXTRA=(--launcher pytorch) ;; esac
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${PORT:-29500}" \
  --nproc_per_node "$NGPUS" \
  "$SCRIPT" "$CONFIG" "${EXTRA[@]}" "$@"
