"""Figures for a ratings table: what a pruning strategy keeps, and what each rank band looks like.

    python scripts/visualize_ratings.py --ratings ratings.csv --out-dir runs/figs \
        --strategy shift_gsample --retention 0.5 [--k 6 --bands 10 --seed 0]

Writes OUT_DIR/selection_<strategy>.png (score histogram; kept share by rank vs expected) and
OUT_DIR/rank_bands.png (k images with captions per rank band). Relative image paths resolve
against the ratings file's folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alchemist.cli import ArgumentParser, non_negative_int, user_errors
from alchemist.plots import plot_rank_bands, plot_selection
from alchemist.ratings import read_ratings
from alchemist.selection import STRATEGIES, parse_retention
from alchemist.utils.io import check_writable


@user_errors
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--strategy", default="shift_gsample", choices=STRATEGIES)
    ap.add_argument("--retention", type=parse_retention, default=0.5)
    ap.add_argument("--reference", help="ratings of trusted pairs by the same rater (Shift-Gsample's tail; prune.py)")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--mu", type=float)
    ap.add_argument("--sigma", type=float)
    ap.add_argument("--shift", type=float)
    ap.add_argument("--start", type=float)
    ap.add_argument("--k", type=int, default=6, help="images per rank band")
    ap.add_argument("--bands", type=int, default=10)
    ap.add_argument("--image-col", default=None, help="default: image_path, else image_save_path")
    ap.add_argument("--caption-col", default="caption")
    args = ap.parse_args(argv)

    params = {k: getattr(args, k) for k in ("mu", "sigma", "shift", "start") if getattr(args, k) is not None}
    out = check_writable(args.out_dir)
    ratings = read_ratings(args.ratings)
    reference = read_ratings(args.reference)["score"].to_numpy() if args.reference else None
    sel = plot_selection(ratings, args.strategy, args.retention, out / f"selection_{args.strategy}.png",
                         args.seed, reference=reference, **params)
    bands = plot_rank_bands(ratings, out / "rank_bands.png", args.k, args.bands, args.seed, args.image_col,
                            args.caption_col, base_dir=Path(args.ratings).resolve().parent)
    print(f"wrote {sel} and {bands}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
