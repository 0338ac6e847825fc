#!/usr/bin/env bash
# Train the rater on all visible GPUs (or one CPU process). Multi-node: NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT. Usage: bash train_rater.sh [--config configs/config_rater.json] [--key=value ...]
exec bash "$(dirname "$0")/scripts/launch.sh" train_rater.py "$@"
