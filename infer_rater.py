"""Rate every pair of a table with a trained rater.

    python infer_rater.py --ckpt runs/rater --csv pairs.csv --out ratings.parquet [--bs 256 --key=value ...]
    bash infer_rater.sh --ckpt ... (all GPUs / nodes; ranks split the rows by shard)
    bash infer_rater.sh --engine ray --ckpt ... (one process driving a Ray actor pool: docs/scale.md)

--ckpt is a run dir (its latest checkpoint) or a checkpoint file. Writes the ratings (input
columns + score, official_score, rank; best first) in the format of --out's extension, skipped
rows to <out stem>.skipped.csv, and finished shards to <out>.shards/ (a rerun resumes from them).
--target <run>/distill_target.parquet ranks a run's own training pairs by the rater and the target it
was fitted to together, as `make demo` does (alchemist/target_blend.py).
--engine ray (alchemist/scoring_ray.py): each input shard is one unit of work for an actor (one per
GPU, or per CPU but one) of a Ray cluster (RAY_ADDRESS, else a local one); same score, no
official_score, the ratings file in shard order with exact ranks. Needs ray[data] (make env has it).
Overrides: data.* keys (e.g. --caption_col=cogvlm_caption), model file locations
(--ckpt_path, --vae_ckpt, --text_enc_path) when they moved since training, and the precision
(--fp16=0 scores in fp32, where a score does not move with the batch; the default on a GPU is bf16).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from accelerate import PartialState

from alchemist.cli import ArgumentParser, unit_fraction, user_errors
from alchemist.scoring import DEFAULT_SHARD_ROWS, rate_file
from alchemist.target_blend import TARGET_WEIGHT, blend_file


@user_errors
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="rater run dir or checkpoint file")
    ap.add_argument("--csv", required=True, help="pairs: a table (.csv / .tsv / .parquet) of id, image path, caption; webdataset .tar shards (a glob or {000..009} range); or parquet with image bytes")
    ap.add_argument("--out", required=True, help="ratings table to write (.csv / .parquet)")
    ap.add_argument("--bs", type=int, default=256, help="rows per forward pass (does not change the score)")
    ap.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="rows per resumable shard")
    ap.add_argument("--num-workers", type=int, help="data loader workers per rank (data.num_workers)")
    ap.add_argument("--cache-dir", help="feature cache of this table from scripts/precompute.py (data.cache_dir)")
    ap.add_argument("--engine", choices=("torch", "ray"), default="torch",
                    help="torch: this process / torchrun ranks (default); ray: a Ray Data actor pool")
    ap.add_argument("--actors", type=int, help="--engine ray: actors in the pool (default: one per GPU, "
                    "else one per CPU but one)")
    ap.add_argument("--target", help="the rater run's distill_target.parquet, when --csv is that run's own "
                    "training pairs: rank them by the rater and its distillation target together "
                    "(alchemist/target_blend.py; the rater's score is kept as rater_score)")
    ap.add_argument("--target-weight", type=unit_fraction, default=TARGET_WEIGHT,
                    help="--target: the target's share of the blend, in [0, 1] (default %(default)s)")
    ap.add_argument("--no-progress", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    if args.target and not Path(args.target).is_file():  # before the scoring, not after it
        raise FileNotFoundError(f"--target {args.target!r} does not exist; a rater run with the distillation "
                                "stage writes <run>/distill_target.parquet")
    overrides += [f"--{k}={v}" for k, v in (("num_workers", args.num_workers), ("cache_dir", args.cache_dir))
                  if v is not None]
    if args.engine == "ray":
        from alchemist.scoring_ray import rate_file_ray

        rate_file_ray(args.ckpt, args.csv, args.out, overrides, batch_size=args.bs, shard_rows=args.shard_rows,
                      actors=args.actors, progress=not args.no_progress)
    else:
        rate_file(args.ckpt, args.csv, args.out, overrides, batch_size=args.bs, shard_rows=args.shard_rows,
                  progress=not args.no_progress)
    if args.target and PartialState().is_main_process:
        blend_file(args.out, args.target, args.target_weight)
    return 0


if __name__ == "__main__":
    sys.exit(main())
