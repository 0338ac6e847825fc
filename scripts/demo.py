#!/usr/bin/env python
"""`make demo`: the whole pipeline on the embedded demo data, on a CPU, in minutes.

1 demo dataset -> 2 tokenizer -> 3 rater (bilevel) -> 4 scores -> 5 Shift-Gsample 50 % subset
-> 6 pictures -> 7 where each planted kind landed. Every stage reuses its output when it is
already there (the rater resumes from its last checkpoint), so a rerun continues where it stopped.
Outputs go under runs/demo/ (or --out).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from alchemist.bilevel.launch import train_rater
from alchemist.tokenizer_training import train_tokenizer_for
from alchemist.config import RaterConfig, load_config
from alchemist.data.demo import DemoSpec, format_summary, generate_demo
from alchemist.evaluation.planted import format_kind_report, kind_report
from alchemist.plots import plot_rank_bands, plot_selection
from alchemist.ratings import read_ratings, write_ratings
from alchemist.scoring import rate_file
from alchemist.selection import prune_table


def stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def done(t: float) -> None:
    print(f"({time.perf_counter() - t:.1f}s)", flush=True)


def train_tokenizer(cfg: RaterConfig, out: Path, steps: int) -> None:
    """The demo's own tokenizer: no pretrained VQ weights exist offline."""
    stats = train_tokenizer_for(cfg.model, cfg.data.train_csv_path, out, steps, cfg.seed, cfg.data.num_workers)
    print(f"tokenizer: recon MSE {stats['recon_mse']:.4f}, codebook usage {stats['usage']:.0%}, "
          f"perplexity {stats['perplexity']:.0f} -> {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="folder for every demo output")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-steps", type=int, default=800)
    ap.add_argument("--retention", type=float, default=0.5)
    args, overrides = ap.parse_known_args(argv)
    out = Path(args.out)
    data = out / "data"

    t = stage("1. demo dataset")
    print(format_summary(generate_demo(data, DemoSpec(n_train=args.n_train, n_val=args.n_val, seed=args.seed))))
    done(t)

    paths = {"train_csv_path": data / "train.csv", "val_csv_path": data / "val.csv", "ckpt_path": out,
             "local_out_dir_path": out, "seed": args.seed}
    # any other --key=value goes to the rater config, e.g. --estimator=lookahead --ep=3
    cfg = load_config(RaterConfig, "configs/demo_rater.json", [f"--{k}={v}" for k, v in paths.items()] + overrides)

    t = stage("2. tokenizer")
    train_tokenizer(cfg, out / "tokenizer.pt", args.tokenizer_steps)  # resumes a killed run, reuses a finished one
    done(t)

    t = stage(f"3. rater: bilevel training, rule '{cfg.bilevel.estimator}'")
    summary = train_rater(cfg)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items() if not k.startswith("L_val_s")})
    done(t)

    t = stage("4. scoring the training set")
    ratings_path = out / "ratings.parquet"
    if ratings_path.exists():
        print(f"reusing {ratings_path}")
    else:
        rate_file(cfg.output.run_dir, data / "train.csv", ratings_path, overrides=[f"--ckpt_path={out}"])
    ratings = read_ratings(ratings_path)
    done(t)

    t = stage(f"5. Shift-Gsample {args.retention:.0%} subset")
    subset = prune_table(ratings, "shift_gsample", args.retention, seed=args.seed, keep_scores=True)
    write_ratings(subset, out / "subset_ratings.parquet")
    subset.drop(columns=["score", "rank"]).to_csv(out / "subset.csv", index=False)
    print(f"kept {len(subset)} of {len(ratings)} pairs -> {out / 'subset.csv'}")
    done(t)

    t = stage("6. pictures")
    print(plot_selection(ratings, "shift_gsample", args.retention, out / "selection.png", seed=args.seed))
    print(plot_rank_bands(ratings, out / "rank_bands.png", seed=args.seed))
    done(t)

    stage("7. where the planted kinds landed (ground truth from defects.csv; never read in training)")
    defects = pd.read_csv(data / "defects.csv", dtype={"id": str})
    report = kind_report(ratings, defects[defects["split"] == "train"], selected_ids=subset["id"])
    print(format_kind_report(report))


if __name__ == "__main__":
    main()
