#!/usr/bin/env python
"""Does the proxy architecture learn to draw what captions ask for? The demo tokenizer, a tiny T2I model
trained on the demo data for a few hundred steps, and a PNG grid of its samples beside real images.

python scripts/demo_generation.py [--out runs/demo] [--grid docs/figures/samples.png] [--ep=10 ...]

1 demo dataset -> 2 tokenizer (shared with `make demo`) -> 3 T2I model (configs/demo_t2i.json, run
folder <out>/t2i, resumable) -> 4 sample grid for val captions. Stages reuse what is already there.
Any --key=value goes to the T2I config.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from alchemist.tokenizer_training import train_tokenizer_for
from alchemist.config import T2IConfig, load_config
from alchemist.data.demo import DemoSpec, format_summary, generate_demo
from alchemist.evaluation.samples import sample_grid
from alchemist.evaluation.train import train_t2i


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="folder for every output")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-steps", type=int, default=800)
    ap.add_argument("--grid", default="", help="PNG path (default <out>/samples.png)")
    ap.add_argument("--rows", type=int, default=8, help="val captions in the grid")
    ap.add_argument("--samples", type=int, default=4, help="samples per caption")
    args, overrides = ap.parse_known_args(argv)
    out = Path(args.out)
    data = out / "data"

    t = time.perf_counter()
    print("=== 1. demo dataset", flush=True)
    print(format_summary(generate_demo(data, DemoSpec(n_train=args.n_train, n_val=args.n_val, seed=args.seed))))
    paths = {"train_csv_path": data / "train.csv", "val_csv_path": data / "val.csv", "ckpt_path": out,
             "local_out_dir_path": out, "seed": args.seed}
    cfg = load_config(T2IConfig, "configs/demo_t2i.json", [f"--{k}={v}" for k, v in paths.items()] + overrides)

    print("=== 2. tokenizer", flush=True)
    tok = out / "tokenizer.pt"  # a killed run resumes, a finished one is reused
    stats = train_tokenizer_for(cfg.model, cfg.data.train_csv_path, tok, args.tokenizer_steps, args.seed,
                                cfg.data.num_workers)
    print(f"tokenizer: recon MSE {stats['recon_mse']:.4f}, codebook usage {stats['usage']:.0%} -> {tok}")

    print(f"=== 3. T2I model: depth {cfg.model.depth}, {cfg.optim.ep} epochs -> {cfg.output.run_dir}", flush=True)
    summary = train_t2i(cfg)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})

    print("=== 4. samples", flush=True)
    grid = sample_grid(cfg.output.run_dir, cfg.data.val_csv_path, args.grid or out / "samples.png", n=args.rows,
                       k=args.samples, seed=args.seed)
    print(f"wrote {grid} ({time.perf_counter() - t:.0f}s in all)")


if __name__ == "__main__":
    main()
