#!/usr/bin/env python
"""Generate images for captions of a pairs table with a trained T2I (or rater-run) proxy and write
a PNG grid: the real image, then K samples, one row per caption.

python scripts/sample_grid.py --run runs/demo/t2i --csv runs/demo/data/val.csv --out grid.png [--n 8 --k 4 --cfg 4]
"""
from __future__ import annotations

import argparse
import sys

from alchemist.cli import ArgumentParser, non_negative_int, user_errors
from alchemist.evaluation.samples import sample_grid


@user_errors
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder (latest checkpoint) or a checkpoint file")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=8, help="captions (rows)")
    ap.add_argument("--k", type=int, default=4, help="samples per caption")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the run's model.cfg)")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    args = ap.parse_args(argv)
    out = sample_grid(args.run, args.csv, args.out, n=args.n, k=args.k, cfg_scale=args.cfg, seed=args.seed)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
