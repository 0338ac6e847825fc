#!/usr/bin/env bash
# Everything a GPU session checks, on one GPU in under 8 minutes, into one folder:
#   1. the CUDA runs of the tests that take the device fixture (pytest -m cuda);
#   2. a synthetic data set at paper scale (scripts/device_check.py fixture: JPEGs, captions, a random
#      VAR-geometry tokenizer, a random 1024x24 CLIP text tower);
#   3. train_rater.sh at paper scale for 24 steps, killed (SIGKILL, whole process group) after the
#      step-8 checkpoint, then run again: it must resume and finish;
#   4. infer_rater.sh on synthetic pairs with the trained rater;
#   5. scripts/bench.py --preset paper, then the performance options (attention by scale, encoders under
#      autocast, torch.compile) on the penalty step;
#   6. device_check.json + device_check.md (stages, resume, targets: twice the authors' throughputs).
# Stages run in that order under one deadline (DEVICE_CHECK_SECONDS, default 470); one that does not
# fit is recorded as skipped. Exit status: non-zero when a stage failed or the resume did not finish.
#
#   bash scripts/device_check.sh [--out DIR] [--dry-run]
# --dry-run: the same stages at toy size on the CPU (the cpu preset, one quick test, no variants):
# what CI runs (tests/test_device_check.py), well under a minute.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0; OUT=runs/device_check
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    *) echo "usage: $0 [--out DIR] [--dry-run]" >&2; exit 2 ;;
  esac
  shift
done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && [ -z "${CONDA_PREFIX:-}" ] && echo .venv/bin/python || echo python )}"
export PYTHON="$PY"  # train_rater.sh / infer_rater.sh use the same interpreter
mkdir -p "$OUT"; rm -f "$OUT/stages.jsonl"
START=$(date +%s); BUDGET="${DEVICE_CHECK_SECONDS:-470}"

if [ "$DRY" = 1 ]; then
  PRESET=cpu; NTRAIN=32; NVAL=32; NSCORE=48; EP=3; SAVE=2; KILL_AT=4; WORKERS=0; SCORE_BS=16
  export NGPU=0  # launch.sh need not start torch to count GPUs
  TESTS=(tests/test_performance.py -k "attention_by_scale_equals_the_masked_call")
  BENCH=(--steps 1 --warmup 0 --rules penalty --modes tokens --score-bs 8)
  VARIANTS=()
else
  # 24 steps; a paper-scale checkpoint (proxy, rater, two AdamW states) is ~4 GB, so three saves only
  PRESET=paper; NTRAIN=512; NVAL=512; NSCORE=2048; EP=3; SAVE=8; KILL_AT=8; WORKERS=8; SCORE_BS=256
  TESTS=(tests -m cuda)
  BENCH=(--steps 5 --warmup 2)
  VARIANTS=("scales:--rules penalty --modes cache --steps 5 --warmup 2 --attn_impl=scales"
            "encoder_amp:--rules penalty --modes raw --steps 5 --warmup 2 --encoder_amp=1"
            "compile:--rules penalty --modes cache --steps 5 --warmup 3 --compile=inductor")
fi
BS=$([ "$DRY" = 1 ] && echo 8 || echo 64)
TRAIN_STEPS=$(( (NVAL / BS) * EP ))

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

record() {  # name rc milliseconds
  awk -v n="$1" -v rc="$2" -v ms="$3" 'BEGIN { printf "{\"stage\": \"%s\", \"rc\": %d, \"seconds\": %.3f}\n", n, rc, ms / 1000 }' \
    >> "$OUT/stages.jsonl"
}

stage() {  # name limit_seconds cmd...: run under the deadline, log to OUT/name.log, record it
  local name=$1 limit=$2; shift 2
  local budget; budget=$(left)
  if [ "$budget" -lt 10 ]; then echo "== $name: skipped (out of time)"; record "$name" 124 0; return 124; fi
  [ "$limit" -gt "$budget" ] && limit=$budget
  echo "== $name (limit ${limit}s)"
  local t0 rc; t0=$(date +%s%N)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  record "$name" "$rc" $(( ($(date +%s%N) - t0) / 1000000 ))
  [ "$rc" -ne 0 ] && { echo "   failed ($rc); last lines of $OUT/$name.log:"; tail -5 "$OUT/$name.log"; }
  return $rc
}

latest_step() {
  ls "$OUT/train/checkpoints" 2>/dev/null | sed -n 's/^step_0*\([0-9][0-9]*\)\.pt$/\1/p' | sort -n | tail -1
}

train_killed() {  # start training in its own process group, SIGKILL the group after checkpoint KILL_AT
  setsid "$@" &
  local pid=$! step
  kill_run() {  # the group we made (setsid without a fork: pid = pgid), else the process alone
    if [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ]; then kill -KILL -- "-$pid"; else kill -KILL "$pid"; fi
  }
  trap 'kill_run 2>/dev/null; exit 124' TERM
  while kill -0 "$pid" 2>/dev/null; do
    step=$(latest_step)
    if [ -n "$step" ] && [ "$step" -ge "$KILL_AT" ]; then
      kill_run
      wait "$pid"
      latest_step > "$OUT/killed_at"  # read once it is dead: a busy machine may save another checkpoint first
      break
    fi
    sleep 0.2
  done
  wait "$pid"
  [ -s "$OUT/killed_at" ]  # succeeds only when the run was killed mid-way
}
export -f train_killed latest_step
export OUT KILL_AT

stage tests 150 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
stage fixture 120 "$PY" scripts/device_check.py fixture --preset "$PRESET" --out "$OUT" --n-train "$NTRAIN" \
  --n-val "$NVAL" --n-score "$NSCORE" --train-steps "$TRAIN_STEPS" $([ "$DRY" = 1 ] && echo --dry-run)

mapfile -t OVR < <(cat "$OUT/overrides.txt" 2>/dev/null)
rm -rf "$OUT/train" "$OUT/killed_at" "$OUT/ratings.parquet" "$OUT/ratings.parquet.shards"
TRAIN=(bash train_rater.sh --config configs/config_rater.json "${OVR[@]}" --local_out_dir_path="$OUT"
       --exp_name=train --ep="$EP" --save_every="$SAVE" --log_every=1 --progress=0 --num_workers="$WORKERS"
       --gamma_start=0.97)
stage train_killed 200 bash -c 'train_killed "$@"' train_killed "${TRAIN[@]}"
stage train_resume 200 "${TRAIN[@]}"
stage infer 120 bash infer_rater.sh --ckpt "$OUT/train" --csv "$OUT/data/score.csv" --out "$OUT/ratings.parquet" \
  --bs "$SCORE_BS" --num-workers "$WORKERS" --no-progress
stage bench 200 "$PY" scripts/bench.py --preset "$PRESET" --json "$OUT/bench.json" "${BENCH[@]}"
for v in "${VARIANTS[@]}"; do
  # shellcheck disable=SC2086
  stage "bench_${v%%:*}" 120 "$PY" scripts/bench.py --preset "$PRESET" --json "$OUT/bench_${v%%:*}.json" ${v#*:}
done

"$PY" scripts/device_check.py report --out "$OUT" $( [ -s "$OUT/killed_at" ] && echo --killed-at "$(cat "$OUT/killed_at")" )
