#!/usr/bin/env bash
# Shared launcher: run a Python entry point on all visible GPUs with accelerate (one plain CPU
# process when there is none). Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on
# every node. Usage: bash scripts/launch.sh SCRIPT.py [args ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && [ -z "${CONDA_PREFIX:-}" ] && echo .venv/bin/python || echo python )}"
SCRIPT="$1"; shift
NGPU="${NGPU:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}"  # NGPU=0: one CPU process
NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"; MASTER_PORT="${MASTER_PORT:-29500}"
if [ "$NGPU" -eq 0 ]; then
  exec "$PY" "$SCRIPT" "$@"
fi
NPROC=$((NGPU * NNODES)); MULTI=(); [ "$NPROC" -gt 1 ] && MULTI=(--multi_gpu)
exec "$PY" -m accelerate.commands.launch "${MULTI[@]}" --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  --num_processes "$NPROC" --mixed_precision no "$SCRIPT" "$@"
