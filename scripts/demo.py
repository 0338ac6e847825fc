#!/usr/bin/env python
"""`make demo`: the whole pipeline on the embedded demo data, on a CPU, in minutes.

Every stage reuses its output when it is already there, so a rerun continues where it stopped.
Outputs go under runs/demo/ (or --out).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from alchemist.data.demo import DemoSpec, format_summary, generate_demo


def stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/demo", help="folder for every demo output")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)

    t = stage("1. demo dataset")
    summary = generate_demo(out / "data", DemoSpec(n_train=args.n_train, n_val=args.n_val, seed=args.seed))
    print(format_summary(summary))
    print(f"({time.perf_counter() - t:.1f}s)")


if __name__ == "__main__":
    main()
