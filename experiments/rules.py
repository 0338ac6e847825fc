"""The rater-update rules compared on the demo data: cost per step relative to a plain proxy step,
and how well each rater's logit separates planted defects from clean pairs (AUROC).

Needs the demo dataset and tokenizer (``make demo`` once). For each rule it trains a rater with
configs/demo_rater.json (+ overrides) into <demo>/rules/<rule>/, scores the training set there and
reads defects.csv. ``scripts/experiment.py rules`` prints the table; the selection experiment can
add a Shift-Gsample arm on any of these ratings (``--rule-arms``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from alchemist.bilevel.estimators import ESTIMATORS
from alchemist.bilevel.launch import train_rater
from alchemist.bilevel.trainer import BilevelTrainer
from alchemist.build import build_proxy, build_rater, build_text_encoder, build_tokenizer
from alchemist.config import RaterConfig, load_config
from alchemist.data.pairs import load_pairs
from alchemist.data.tokens import Featurizer
from alchemist.ratings import read_ratings
from alchemist.runtime import make_stream, setup_runtime
from alchemist.scoring import rate_file
from experiments.planted import kind_report

AUROC_ORDER = ("noise", "misaligned", "plain", "blurred", "duplicate")  # the table's AUROC columns


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


def compare_rules(demo: str | Path = "runs/demo", rules: Sequence[str] = tuple(ESTIMATORS),
                  overrides: Sequence[str] = (), config: str = "configs/demo_rater.json") -> list[dict]:
    """One row per rule: bilevel and plain s/step, their ratio, steps trained and AUROC per defect kind."""
    demo = Path(demo)
    base = {"train_csv_path": demo / "data/train.csv", "val_csv_path": demo / "data/val.csv", "ckpt_path": demo,
            "local_out_dir_path": demo / "rules"}
    defects = pd.read_csv(demo / "data/defects.csv", dtype={"id": str})
    defects = defects[defects["split"] == "train"]
    rows = []
    for rule in rules:
        cfg = load_config(RaterConfig, config,
                          [f"--{k}={v}" for k, v in {**base, "estimator": rule, "exp_name": rule}.items()]
                          + list(overrides))
        bilevel_s, plain_s = step_seconds(cfg)
        summary = train_rater(cfg)
        out = cfg.output.run_dir / "ratings.parquet"
        if not out.exists():
            rate_file(cfg.output.run_dir, cfg.data.train_csv_path, out, overrides=[f"--ckpt_path={demo}"],
                      progress=False)
        rep = kind_report(read_ratings(out), defects)
        rows.append({"rule": rule, "bilevel s/step": bilevel_s, "plain s/step": plain_s, "ratio": bilevel_s / plain_s,
                     "steps": summary["steps"], **{f"AUROC {k}": rep["auroc"][k] for k in AUROC_ORDER}})
    return rows


def format_rules_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (floats to 3 decimals)."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |"
              for r in rows]
    return "\n".join(lines)
