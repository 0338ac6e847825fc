"""Rater quality over seeds: the whole rating pipeline (dataset, tokenizer, bilevel rater, scoring,
Shift-Gsample subset) once per seed, and each planted kind's AUROC and keep rate as mean ± std.

One seed is one ``scripts/demo.py --bench B --seed S`` run in its own process with one torch thread
(that script's default; ``make demo`` pins two, so its numbers differ from seed 0's), ``jobs`` at a
time; a rerun reuses every finished stage. The subsets are chosen again from the saved ratings with
the current selection rule, so a changed rule is reported without rerunning the seeds. Every rater
claim in docs/ comes from this report.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from alchemist.bilevel.distill import TARGET_FILE
from alchemist.ratings import read_ratings
from alchemist.selection import prune_table, select
from alchemist.utils.io import atomic_open
from experiments.demo import pipeline_ratings, reference_scores
from experiments.planted import kind_report
from experiments.types import DEFECT_KINDS

ROOT = Path(__file__).resolve().parents[1]


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def run_seed(bench: str, seed: int, out: Path, args: Sequence[str] = ()) -> float:
    """One seed of the pipeline in a child process (log in <seed dir>/log.txt); its wall seconds."""
    d = seed_dir(out, seed)
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "scripts/demo.py"), "--bench", bench, "--seed", str(seed), "--out", str(d), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    with open(d / "log.txt", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise RuntimeError(f"seed {seed} failed (exit {proc.returncode}); see {d / 'log.txt'}")
    return time.perf_counter() - t0


def seed_report(d: Path, seed: int) -> pd.DataFrame:
    """Per defect kind of one seed's run: AUROC of clean against it, and the share of it the default
    Shift-Gsample 50 % subset (``run_demo``'s) keeps;
    with a distilled rater also the AUROC of the target it was fitted to (NaN without one)."""
    ratings = pipeline_ratings(d)
    subset = prune_table(ratings, "shift_gsample", 0.5, seed=seed, reference=reference_scores(d))
    defects = pd.read_csv(d / "data/defects.csv", dtype={"id": str}, keep_default_na=False)
    train = defects[defects["split"] == "train"]
    rep = kind_report(ratings, train, selected_ids=subset["id"])
    kinds = [k for k in DEFECT_KINDS if k in rep["auroc"].index]
    target = np.full(len(kinds), np.nan)
    if (path := d / "rater" / TARGET_FILE).is_file():
        taught = pd.read_parquet(path).rename(columns={"target": "score"})
        target = kind_report(taught[["id", "score"]], train)["auroc"].reindex(kinds).to_numpy()
    return pd.DataFrame({"kind": kinds, "auroc": rep["auroc"].reindex(kinds).to_numpy(),
                         "kept": rep["kept"].reindex(kinds).to_numpy(), "target_auroc": target}
                        ).assign(kept_clean=float(rep["kept"]["clean"]))


# what each strategy keeps from the same ratings at 50 % (the first is the pipeline's own subset);
# the third field: whether the strategy is given the rater's validation scores (Shift-Gsample's reference)
STRATEGIES = {"Shift-Gsample (default)": ("shift_gsample", {}, True),
              "Shift-Gsample, no reference (tail 0.15)": ("shift_gsample", {}, False),
              "Shift-Gsample, no tail (paper µ/σ/shift)": ("shift_gsample", {"tail": 0.0, "shift": 0.25, "mu": 0.55,
                                                                              "sigma": 0.15}, False),
              "Gsample": ("gsample", {}, False), "Top-K": ("topk", {}, False),
              "block (start 0.4)": ("block", {}, False), "random": ("random", {}, False)}


def strategy_keeps(d: Path, seed: int, retention: float = 0.5) -> pd.DataFrame:
    """Share of each kind (rows) that each strategy (columns) keeps from one seed's ratings."""
    ratings = pipeline_ratings(d)
    defects = pd.read_csv(d / "data/defects.csv", dtype={"id": str}, keep_default_na=False)
    kind = ratings["id"].astype(str).map(defects.set_index("id")["kind"])
    out, reference = {}, reference_scores(d)
    for name, (strategy, params, trusted) in STRATEGIES.items():
        kept = np.zeros(len(ratings), dtype=bool)
        kept[select(ratings, strategy, retention, seed=seed, reference=reference if trusted else None, **params)] = True
        out[name] = pd.Series(kept).groupby(kind.to_numpy()).mean()
    return pd.DataFrame(out)


def summarize(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over seeds, per kind."""
    g = per_seed.groupby("kind", sort=False)
    return pd.DataFrame({"auroc_mean": g["auroc"].mean(), "auroc_std": g["auroc"].std(ddof=1),
                         "kept_mean": g["kept"].mean(), "kept_std": g["kept"].std(ddof=1), "seeds": g.size(),
                         "target_auroc_mean": g["target_auroc"].mean(), "target_auroc_std": g["target_auroc"].std(ddof=1)})


def format_keeps(keeps: pd.DataFrame) -> str:
    """Mean over seeds of ``strategy_keeps`` as a Markdown table."""
    lines = ["| kind | " + " | ".join(keeps.columns) + " |", "|---" * (len(keeps.columns) + 1) + "|"]
    for kind, r in keeps.iterrows():
        lines.append(f"| {kind} | " + " | ".join(f"{v:.1%}" for v in r) + " |")
    return "\n".join(lines)


def format_summary(bench: str, table: pd.DataFrame, per_seed: pd.DataFrame) -> str:
    seeds = sorted(per_seed["seed"].unique())
    lines = [f"{bench}: {len(seeds)} seeds ({', '.join(map(str, seeds))}); AUROC clean > kind (of the pipeline's "
             "ranking: the rater's, blended with its distillation target when it has one) and the share of the kind "
             "the Shift-Gsample 50 % subset kept, mean ± std over seeds", "",
             "| kind | AUROC | kept by Shift-Gsample 50 % | AUROC per seed | AUROC of the distillation target |",
             "|---|---|---|---|---|"]
    for kind, r in table.iterrows():
        each = ", ".join(f"{a:.3f}" for a in per_seed[per_seed["kind"] == kind].sort_values("seed")["auroc"])
        taught = "" if np.isnan(r.target_auroc_mean) else f"{r.target_auroc_mean:.3f} ± {r.target_auroc_std:.3f}"
        lines.append(f"| {kind} | {r.auroc_mean:.3f} ± {r.auroc_std:.3f} | {r.kept_mean:.1%} ± {r.kept_std:.1%} | {each} "
                     f"| {taught} |")
    clean = per_seed.drop_duplicates("seed")["kept_clean"]
    lines.append(f"| (clean) | | {clean.mean():.1%} ± {clean.std(ddof=1):.1%} | | |")
    return "\n".join(lines)


def run_sweep(bench: str, seeds: Sequence[int], out: str | Path, jobs: int = 2, args: Sequence[str] = ()) -> pd.DataFrame:
    """Run (or reuse) every seed, then write <out>/sweep.json and <out>/sweep.md; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in seeds if not (seed_dir(out, s) / "subset_ratings.parquet").exists()]
    seconds: dict[int, float] = {}
    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_seed, bench, s, out, args): s for s in todo}
        for fut in cf.as_completed(futures):
            seconds[futures[fut]] = fut.result()
            print(f"seed {futures[fut]} done in {seconds[futures[fut]]:.0f}s", flush=True)
    per_seed = pd.concat([seed_report(seed_dir(out, s), s).assign(seed=s) for s in seeds], ignore_index=True)
    table = summarize(per_seed)
    keeps = sum(strategy_keeps(seed_dir(out, s), s) for s in seeds) / len(seeds)
    keeps = keeps.reindex([k for k in ("clean", *DEFECT_KINDS) if k in keeps.index])
    text = (format_summary(bench, table, per_seed) + "\n\nShare of each kind that each strategy keeps at 50 % from "
            "the same ratings, mean over seeds:\n\n" + format_keeps(keeps))
    with atomic_open(out / "sweep.md") as f:
        f.write(text + "\n")
    record = {"bench": bench, "seeds": list(seeds), "args": list(args), "seconds": seconds,
              "per_seed": per_seed.replace({np.nan: None}).to_dict("records"),
              "summary": table.reset_index().replace({np.nan: None}).to_dict("records"),
              "strategy_keeps": keeps.to_dict()}
    with atomic_open(out / "sweep.json") as f:
        json.dump(record, f, indent=2)
    print(text)
    return table
