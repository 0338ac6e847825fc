#!/usr/bin/env bash
# Rate a pairs table on all visible GPUs (or one CPU process); ranks split the rows by shard.
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (a shared filesystem for --out).
# --engine ray: one process that drives a Ray actor pool (RAY_ADDRESS, else a local cluster); not torchrun.
# Usage: bash infer_rater.sh --ckpt RUN_DIR --csv pairs.csv --out ratings.parquet [--bs 256 --key=value ...]
ENGINE=torch; PREV=
for a in "$@"; do
  case "$a" in --engine=*) ENGINE="${a#--engine=}" ;; esac
  [ "$PREV" = "--engine" ] && ENGINE="$a"
  PREV="$a"
done
[ "$ENGINE" = ray ] && export NGPU=0  # one plain process: Ray, not torchrun, spreads the work
exec bash "$(dirname "$0")/scripts/launch.sh" infer_rater.py "$@"
