#!/usr/bin/env bash
# Rate a pairs table on all visible GPUs (or one CPU process); ranks split the rows by shard.
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (a shared filesystem for --out).
# Usage: bash infer_rater.sh --ckpt RUN_DIR --csv pairs.csv --out ratings.parquet [--bs 256 --key=value ...]
exec bash "$(dirname "$0")/scripts/launch.sh" infer_rater.py "$@"
