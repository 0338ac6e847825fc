#!/usr/bin/env python
"""Compare the rater-update rules on the demo data: cost per step relative to a plain proxy step,
and how well each rater's logit separates planted defects from clean pairs (AUROC).

Needs the demo dataset and tokenizer (run `make demo` once). For each rule it trains a rater with
configs/demo_rater.json (+ overrides), scores the training set and reads defects.csv.
python scripts/compare_rules.py [--demo runs/demo] [--rules penalty,reference,lookahead] [--key=value ...]
Writes <demo>/rules/<rule>/... and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from alchemist.bilevel.estimators import ESTIMATORS
from alchemist.bilevel.launch import train_rater
from alchemist.bilevel.trainer import BilevelTrainer
from alchemist.build import build_proxy, build_rater, build_text_encoder, build_tokenizer
from alchemist.config import RaterConfig, load_config
from alchemist.data.pairs import load_pairs
from alchemist.data.tokens import Featurizer
from alchemist.evaluation.planted import kind_report
from alchemist.ratings import read_ratings
from alchemist.runtime import make_stream, setup_runtime
from alchemist.scoring import rate_file


def _median_seconds(fn, steps: int) -> float:
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(torch.tensor(times[2:]).median())


def step_seconds(cfg: RaterConfig, steps: int = 8) -> tuple[float, float]:
    """Median seconds of (a bilevel step of cfg's rule, a plain proxy step) on the same featurised
    batches of optim.bs, so the ratio is the rule's own overhead (no data loading or encoding)."""
    rt = setup_runtime(cfg.optim.bs, cfg.seed)
    text = build_text_encoder(cfg.model, rt.device)
    featurize = Featurizer(build_tokenizer(cfg.model, rt.device), text, rt.device)
    streams = [make_stream(load_pairs(p, cfg.data), cfg.data, s, rt, shuffle=False, drop_last=True,
                           caption_dropout=0.0, seed=0) for s, p in (("train", cfg.data.train_csv_path),
                                                                     ("val", cfg.data.val_csv_path))]
    train_b, val_b = (featurize(next(iter(s.make_loader(s.sampler)))) for s in streams)
    proxy = build_proxy(cfg.model, text.width, rt.device)
    rater = build_rater(cfg.model, text.width, rt.device)
    trainer = BilevelTrainer(cfg, proxy, rater, featurize, streams[1], streams[0], rt.device, is_main=False)
    bilevel = _median_seconds(lambda: trainer.train_step(train_b, val_b), steps)
    return bilevel, _median_seconds(lambda: trainer.plain_proxy_step(train_b), steps)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="runs/demo")
    ap.add_argument("--rules", default=",".join(ESTIMATORS))
    args, overrides = ap.parse_known_args(argv)
    demo = Path(args.demo)
    base = {"train_csv_path": demo / "data/train.csv", "val_csv_path": demo / "data/val.csv", "ckpt_path": demo,
            "local_out_dir_path": demo / "rules"}
    defects = pd.read_csv(demo / "data/defects.csv", dtype={"id": str})
    defects = defects[defects["split"] == "train"]
    rows = []
    for rule in args.rules.split(","):
        cfg = load_config(RaterConfig, "configs/demo_rater.json",
                          [f"--{k}={v}" for k, v in {**base, "estimator": rule, "exp_name": rule}.items()] + overrides)
        bilevel_s, plain_s = step_seconds(cfg)
        summary = train_rater(cfg)
        out = cfg.output.run_dir / "ratings.parquet"
        if not out.exists():
            rate_file(cfg.output.run_dir, cfg.data.train_csv_path, out, overrides=[f"--ckpt_path={demo}"], progress=False)
        rep = kind_report(read_ratings(out), defects)
        rows.append({"rule": rule, "bilevel s/step": bilevel_s, "plain s/step": plain_s, "ratio": bilevel_s / plain_s,
                     "steps": summary["steps"],
                     **{f"AUROC {k}": rep["auroc"][k] for k in ("noise", "misaligned", "plain", "blurred", "duplicate")}})
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
