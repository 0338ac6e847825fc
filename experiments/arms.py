"""The selection experiment's arms: which training pairs each arm keeps, and the rankings they draw on.

An arm (``experiments.types.Arm``) is a ranking (the rater's, an image heuristic's, or none for full
data), a selection strategy and a retention. Kept apart from the runs and the report: choosing and
checking the subsets needs none of the training machinery.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from alchemist.data.pairs import DataError
from alchemist.heuristics import make_scorer, rate_pairs
from alchemist.ratings import read_ratings, write_ratings
from alchemist.selection import prune_table
from alchemist.utils.io import atomic_open
from experiments.planted import kind_report
from experiments.types import HEURISTIC_CANDIDATES, KINDS, Arm, ExperimentConfig, Inputs


# ----------------------------------------------------------------------------- arms
def rater_arms() -> list[Arm]:
    """The arms that need no heuristic: full, random / Shift-Gsample / Top-K 50 %, random / Shift-Gsample 20 %."""
    return [Arm("full", "all", "all", 1.0),
            Arm("random_50", "rater", "random", 0.5),
            Arm("shift_gsample_50", "rater", "shift_gsample", 0.5),
            Arm("topk_50", "rater", "topk", 0.5),
            Arm("random_20", "rater", "random", 0.2),
            Arm("shift_gsample_20", "rater", "shift_gsample", 0.2)]


def heuristic_arm(name: str, retention: float = 0.5) -> Arm:
    return Arm(f"{name}_{round(retention * 100)}", name, "topk", retention)


def rule_arm(rule: str, retention: float = 0.5) -> Arm:
    """Shift-Gsample on another update rule's ratings (<rules_dir>/<rule>), e.g. the official `penalty`."""
    return Arm(f"{rule}_shift_gsample_{round(retention * 100)}", f"rule:{rule}", "shift_gsample", retention)


def plan_arms(heuristics: Sequence[str], rules: Sequence[str] = ()) -> list[Arm]:
    arms = rater_arms()
    return arms[:4] + [heuristic_arm(h) for h in heuristics] + [rule_arm(r) for r in rules] + arms[4:]


# ----------------------------------------------------------------------------- rankings
def heuristic_ratings(cfg: ExperimentConfig, inp: Inputs, names: Sequence[str] = HEURISTIC_CANDIDATES,
                      progress: bool = True) -> dict[str, pd.DataFrame]:
    """Ratings by each image statistic over the rated pairs, computed once into <out>/heuristics/."""
    out = {}
    for name in names:
        path = cfg.out_dir / "heuristics" / f"{name}.parquet"
        if path.is_file():
            r = read_ratings(path)
            if set(r["id"]) == set(inp.pairs["id"]):
                out[name] = r
                continue
        r, skipped = rate_pairs(inp.pairs, name, make_scorer(name), image_size=inp.base.data.image_size, bs=256,
                                progress=progress)
        if skipped:
            raise DataError(f"{len(skipped)} images could not be read when scoring {name} (first: {skipped[0]})")
        write_ratings(r, path)
        out[name] = read_ratings(path)
    return out


def planted_quality(rankings: dict[str, pd.DataFrame], defects: pd.DataFrame) -> dict[str, dict]:
    """Per ranking: AUROC clean vs each planted kind, the mean over kinds, and the rank-decile table."""
    out = {}
    for name, r in rankings.items():
        rep = kind_report(r, defects)
        aurocs = {k: float(v) for k, v in rep["auroc"].items()}
        out[name] = {"n": {k: int(v) for k, v in rep["n"].items()}, "auroc": aurocs,
                     "mean_auroc": float(np.mean(list(aurocs.values()))) if aurocs else math.nan,
                     "deciles": {k: [float(x) for x in row] for k, row in rep["deciles"].iterrows()}}
    return out


def rule_ratings(cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
    """``<rules_dir>/<rule>/ratings.parquet`` written by scripts/experiment.py rules, one per update rule."""
    root = Path(cfg.rules_dir) if cfg.rules_dir else cfg.demo_dir / "rules"
    if cfg.rules_dir and not root.is_dir():
        raise FileNotFoundError(f"--rules-dir {str(root)!r} does not exist; run scripts/experiment.py rules first")
    if not root.is_dir():
        return {}
    return {p.parent.name: read_ratings(p) for p in sorted(root.glob("*/ratings.parquet"))}


def choose_heuristics(cfg: ExperimentConfig, quality: dict[str, dict]) -> tuple[list[str], str]:
    """Which heuristics get a 50 % arm, and why (said in the results)."""
    if cfg.heuristics == "all":
        return list(HEURISTIC_CANDIDATES), ("all three heuristics were trained; the best is the one with the lowest "
                                            "mean held-out loss")
    best = max(HEURISTIC_CANDIDATES, key=lambda h: quality[h]["mean_auroc"])
    scores = ", ".join(f"{h} {quality[h]['mean_auroc']:.3f}" for h in HEURISTIC_CANDIDATES)
    return [best], (f"one heuristic arm, to fit the time budget: the heuristic whose ranking best separates clean "
                    f"pairs from the planted defects (mean AUROC over the defect kinds: {scores}) — the same "
                    f"criterion the raters are judged by below; --heuristics all trains all three")


# ----------------------------------------------------------------------------- subsets
def subset_ids(arm: Arm, seed: int, rankings: dict[str, pd.DataFrame], universe: pd.Series,
               references: dict[str, np.ndarray] | None = None) -> list[str]:
    """The ids one arm keeps for one seed (selection seed = seed); ``references``: per ranking source,
    the same scorer's scores of trusted pairs (Shift-Gsample's tail, ``selection.select``)."""
    if arm.source == "all":
        return universe.astype(str).tolist()
    table = rankings[arm.source]
    kept = prune_table(table, arm.strategy, arm.retention, seed=seed, reference=(references or {}).get(arm.source))
    return kept["id"].astype(str).tolist()


def write_subset(ids: Sequence[str], pairs: pd.DataFrame, path: Path) -> Path:
    """The selected rows of the pairs table (absolute image paths, file order) as a CSV; a rerun must
    select exactly the same rows (else the ratings changed under the experiment)."""
    chosen = set(ids)
    rows = pairs[pairs["id"].isin(chosen)]
    if path.is_file():
        old = set(pd.read_csv(path, dtype=str, keep_default_na=False)["id"])
        if old != chosen:
            raise DataError(f"{str(path)!r} holds another subset than this run selects (the ratings or the "
                            "selection changed); use a new --out or delete the experiment folder")
        return path
    with atomic_open(path) as f:
        rows.to_csv(f, index=False)
    return path


def composition(ids: Sequence[str], defects: pd.DataFrame) -> dict[str, float]:
    """Share of each planted kind among the selected rows."""
    kinds = defects.set_index("id")["kind"].reindex(list(ids))
    shares = kinds.value_counts(normalize=True)
    return {k: float(shares.get(k, 0.0)) for k in KINDS}
