"""Prune a rated dataset: keep the rows a strategy selects, in rank order.

    python scripts/prune.py --ratings ratings.parquet --out subset.csv \
        --strategy shift_gsample --retention 0.5 [--reference val_ratings.parquet]
        [--seed 0 --mu 0.55 --sigma 0.15 --shift 0.25 --tail 0.15]

Shift-Gsample's defaults follow the rule in docs/selection.md: the tail is the largest junk share
consistent with --reference (the same rater's ratings of trusted pairs, e.g. its validation set), at
least 0.15, and 0.15 without one; the shift the paper's (shrunk to fit), the Gaussian centred on what is left.

--retention is a fraction when it has a decimal point or a % sign (0.5, 50%, 1.0 = all)
and a row count when it is a whole number (1000). The output keeps the input's columns,
minus score/rank unless --keep-scores; its format follows --out's extension.

Per-shard ratings (scoring's <ratings>.shards folder, a glob or several parquet files) are pruned
without loading them whole (alchemist/rank_stream.py: exact ranks from two chunked passes, the same
selection as in memory); also with --out x.npy (sorted uids, DataComp's subset format) or --keep-column:

    python scripts/prune.py --ratings ratings.parquet.shards --out subset.npy --retention 0.3
    python scripts/prune.py --ratings 'ratings/*.parquet' --out kept.parquet --keep-column flagged/ ...

There --out .parquet / .csv holds the kept ids with score and rank, and --keep-column DIR gets each
input file again with rank and a boolean keep column.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

import numpy as np

from alchemist.cli import ArgumentParser, non_negative_int, user_errors
from alchemist.rank_stream import DEFAULT_CHUNK_ROWS, check_out, prune_stream, ratings_files
from alchemist.ratings import read_ratings, table_format, write_table
from alchemist.selection import STRATEGIES, check_reference, parse_retention, prune_table, rank_histogram, resolve_params
from alchemist.utils.io import check_writable


@user_errors
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", required=True, nargs="+",
                    help="ratings table (.csv / .parquet), or per-shard ratings: a folder, a glob, several files")
    ap.add_argument("--out", help="subset to write (.csv / .parquet; .npy: sorted ids, per-shard input)")
    ap.add_argument("--keep-column", metavar="DIR", help="per-shard input: write each file to DIR with rank and keep")
    ap.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="per-shard input: rows read at a time")
    ap.add_argument("--strategy", default="shift_gsample", choices=STRATEGIES)
    ap.add_argument("--retention", required=True, type=parse_retention)
    ap.add_argument("--reference", help="ratings (.csv / .parquet, a score column) of trusted pairs by the same "
                    "rater, e.g. infer_rater.py on its validation set: Shift-Gsample's tail cuts the most junk "
                    "they allow for")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--mu", type=float, help="gsample / shift_gsample: Gaussian centre (rank fraction)")
    ap.add_argument("--sigma", type=float, help="gsample / shift_gsample: Gaussian width (rank fraction)")
    ap.add_argument("--shift", type=float, help="shift_gsample: discard ranks below this fraction")
    ap.add_argument("--tail", type=float, help="shift_gsample: discard the last ranks, this fraction of them")
    ap.add_argument("--start", type=float, help="block: window start (rank fraction)")
    ap.add_argument("--keep-scores", action="store_true", help="keep the score and rank columns")
    args = ap.parse_args(argv)

    params = {k: getattr(args, k) for k in ("mu", "sigma", "shift", "tail", "start") if getattr(args, k) is not None}
    if args.out is None and args.keep_column is None:
        ap.error("give --out, --keep-column or both")
    reference = check_reference(read_ratings(args.reference)["score"]) if args.reference else None
    one = args.ratings[0]
    if (len(args.ratings) > 1 or os.path.isdir(one) or glob.has_magic(one) or args.keep_column
            or (args.out or "").lower().endswith(".npy") or args.out is None):
        return _prune_shards(args, params, reference)
    table_format(args.out)  # a bad extension or a read-only folder fails before the pruning
    check_writable(Path(args.out).resolve().parent)
    ratings = read_ratings(one)
    subset = prune_table(ratings, args.strategy, args.retention, args.seed, keep_scores=True, reference=reference,
                         **params)
    used = resolve_params(args.strategy, len(ratings), args.retention, ratings["score"].to_numpy(), reference, **params)
    n, k = len(ratings), len(subset)
    hist = rank_histogram(subset["rank"].to_numpy(), n)
    if not args.keep_scores:
        subset = subset.drop(columns=["score", "rank"])
    write_table(subset, args.out)

    _report(args, n, k, used, hist, args.out)
    return 0


def _prune_shards(args: argparse.Namespace, params: dict, reference: np.ndarray | None) -> int:
    if args.out:
        check_out(args.out)
        check_writable(Path(args.out).resolve().parent)
    files = ratings_files(args.ratings)
    res = prune_stream(files, args.strategy, args.retention, args.seed, out=args.out, keep_dir=args.keep_column,
                       chunk_rows=args.chunk_rows, reference=reference, **params)
    n, k = res["n"], res["kept"]
    dest = " and ".join(x for x in (args.out, args.keep_column and f"{args.keep_column} (keep column)") if x)
    _report(args, n, k, res["params"], rank_histogram(res["kept_ranks"], n), f"{dest} ({len(files)} files read)")
    return 0


def _report(args: argparse.Namespace, n: int, k: int, used: dict, hist: np.ndarray, dest: str) -> None:
    print(f"kept {k} of {n} rows ({k / n:.2%}) with {args.strategy} seed={args.seed} -> {dest}")
    if used:
        print("parameters: " + ", ".join(f"{p} {v:.4g}" for p, v in used.items()))
    print("rank decile   kept   share of decile")
    sizes = np.diff(-(-np.arange(11) * n // 10))  # rows per decile: ranks i with i * 10 // n == d
    for d, (c, size) in enumerate(zip(hist, sizes)):
        share = c / size if size else 0.0
        print(f"  {d * 10:3d}-{d * 10 + 10:3d}%  {c:7d}   {share:6.1%}  {'#' * round(40 * share)}")


if __name__ == "__main__":
    sys.exit(main())
