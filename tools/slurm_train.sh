#!/usr/bin/env bash
# Train on a SLURM cluster: one torchrun per node, GPUS in total (8 per node by default).
#   tools/slurm_train.sh PARTITION JOB_NAME CONFIG GPUS [extra args...]
# Env: GPUS_PER_NODE (default min(GPUS, 8)), CPUS_PER_TASK (default 8), PORT (default 29500), SRUN_ARGS.
# Each node runs tools/dist_train.sh with NNODES/NODE_RANK/MASTER_ADDR taken from SLURM, so the same
# dispatch applies (.yaml -> classification, .py -> mmengine tools/train.py).
set -euo pipefail
if [ $# -lt 4 ]; then echo "usage: $0 PARTITION JOB_NAME CONFIG GPUS [args...]" >&2; exit 2; fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
GPUS=$4
shift 4
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
NNODES=$(( (GPUS + GPUS_PER_NODE - 1) / GPUS_PER_NODE ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC2086
srun -p "$PARTITION" --job-name="$JOB_NAME" --nodes="$NNODES" --ntasks-per-node=1 \
  --gres=gpu:"$GPUS_PER_NODE" --cpus-per-task="${CPUS_PER_TASK:-8}" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
  bash -c 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) \
           NNODES=$SLURM_NNODES NODE_RANK=$SLURM_NODEID \
           exec "$0"/tools/dist_train.sh "$@"' "$ROOT" "$CONFIG" "$GPUS_PER_NODE" "$@"
