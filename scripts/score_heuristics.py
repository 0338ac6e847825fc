"""Rate a pairs table with a heuristic baseline (the paper's Table 1) instead of the rater.

    python scripts/score_heuristics.py --csv pairs.csv --out ratings.csv --heuristic clarity
    python scripts/score_heuristics.py --csv pairs.csv --out ratings.parquet --heuristic aesthetic \
        --clip-path /models/clip-vit-large-patch14 --mlp-path /models/sac+logos+ava1-l14-linearMSE.pth

Writes the ratings format (input columns + the raw statistic + score + rank; higher score =
better, see alchemist/heuristics.py for each direction) and skipped.csv beside the output.
Feed the ratings to scripts/prune.py, e.g. --strategy topk.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from alchemist.cli import ArgumentParser, user_errors
from alchemist.config import DataConfig
from alchemist.data.pairs import SkipLog, load_pairs
from alchemist.heuristics import HEURISTICS, make_scorer, rate_pairs
from alchemist.ratings import table_format, write_ratings
from alchemist.utils.io import check_writable


@user_errors
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", required=True, help="pairs table (.csv / .parquet) with id, image path, caption")
    ap.add_argument("--out", required=True, help="ratings table to write (.csv / .parquet)")
    ap.add_argument("--heuristic", required=True, choices=HEURISTICS)
    ap.add_argument("--clip-path", default="", help="local CLIP directory (clip, aesthetic)")
    ap.add_argument("--mlp-path", default="", help="local LAION aesthetic MLP state dict (aesthetic)")
    ap.add_argument("--image-size", type=int, default=256, help="images are centre-cropped and resized to this")
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--flip", action="store_true", help="reverse the heuristic's better direction")
    args = ap.parse_args(argv)

    table_format(args.out)  # a bad extension or a read-only folder fails before the scoring
    check_writable(Path(args.out).resolve().parent)
    skip_log = SkipLog()
    scorer = make_scorer(args.heuristic, args.clip_path, args.mlp_path, args.device)
    table = load_pairs(args.csv, DataConfig(image_size=args.image_size), skip_log)
    ratings, skipped = rate_pairs(table, args.heuristic, scorer, args.image_size, args.bs, args.workers, args.flip)
    skip_log.extend(skipped)
    write_ratings(ratings, args.out)
    skip_path = skip_log.write(Path(args.out).parent / "skipped.csv")
    print(f"rated {len(ratings)} pairs with {args.heuristic} -> {args.out}; "
          f"skipped {skip_log.count} (listed in {skip_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
