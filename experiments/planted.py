"""Where the demo's planted defects land in a ranking: ratings checked against ``defects.csv``.

The demo dataset (experiments.demo_data) knows the kind of every pair: ``clean`` or one of the
planted defects. A ranking is then judged without any downstream training: how well clean pairs
separate from each kind (AUROC, clean = positive), which rank deciles each kind falls into, and
what share of each kind a pruning strategy keeps. Not every defect should sink: the paper's top
ranks are plain, easy images (docs/method.md §6), so ``plain`` above clean (AUROC < 0.5) is the
expected shape, and it is what Shift-Gsample's dropped head is for.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from alchemist.utils.errors import UserError
from experiments.types import KINDS

N_DECILES = 10


def auroc(scores_pos, scores_neg) -> float:
    """P(a random positive scores above a random negative), ties counting 1/2 (Mann-Whitney U / n·m)."""
    pos = np.asarray(scores_pos, dtype=np.float64).ravel()
    neg = np.asarray(scores_neg, dtype=np.float64).ravel()
    if not len(pos) or not len(neg):
        raise ValueError(f"AUROC needs scores on both sides, got {len(pos)} positive and {len(neg)} negative")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("AUROC got NaN scores")
    ranks = rankdata(np.concatenate([pos, neg]))  # 1-based, ties get their average rank
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def kind_report(ratings: pd.DataFrame, defects: pd.DataFrame, selected_ids: Iterable[str] | None = None) -> dict:
    """Per planted kind, over the rated rows (all of which must have a kind in ``defects``):

    - ``n``: rows of the kind; ``mean_score``: their mean score;
    - ``auroc``: clean (positive) vs that kind, for every defect kind (needs clean rows);
    - ``deciles``: DataFrame kinds × rank deciles 0..9 (0 = best-rated tenth); each *row* sums to 1,
      the share of that kind's rows in each decile;
    - ``kept`` (only with ``selected_ids``): the fraction of the kind's rows that were selected.
    """
    kinds = defects.assign(id=defects["id"].astype(str)).set_index("id")["kind"]
    r = ratings.assign(id=ratings["id"].astype(str), score=pd.to_numeric(ratings["score"]))
    order = ["rank"] if "rank" in r.columns else ["score", "id"]
    r = r.sort_values(order, ascending=[True] if "rank" in r.columns else [False, True], ignore_index=True)
    r["kind"] = r["id"].map(kinds)
    unknown = r["kind"].isna()
    if unknown.any():
        raise UserError(f"{int(unknown.sum())} rated ids are not in the defects table (first: "
                         f"{r.loc[unknown, 'id'].iloc[0]!r}); pass the defects.csv of the dataset that was rated")
    present = set(r["kind"])
    names = [k for k in KINDS if k in present] + sorted(present - set(KINDS))
    r["decile"] = np.arange(len(r)) * N_DECILES // len(r)
    by_kind = r.groupby("kind", sort=False)
    report = {
        "n": by_kind.size().reindex(names),
        "mean_score": by_kind["score"].mean().reindex(names),
        "auroc": pd.Series({k: auroc(r.loc[r["kind"] == "clean", "score"], r.loc[r["kind"] == k, "score"])
                            for k in names if k != "clean" and "clean" in present}, dtype=np.float64),
        "deciles": pd.crosstab(r["kind"], r["decile"], normalize="index")
        .reindex(index=names, columns=range(N_DECILES), fill_value=0.0).rename_axis(index="kind", columns="decile"),
    }
    if selected_ids is not None:
        chosen = pd.Index(pd.Series(list(selected_ids), dtype=str).unique())
        stray = chosen.difference(r["id"])
        if len(stray):
            raise UserError(f"{len(stray)} selected ids are not in the ratings (first: {stray[0]!r}); "
                             "select from the same ratings file")
        report["kept"] = r["id"].isin(chosen).groupby(r["kind"]).mean().reindex(names)
    return report


def format_kind_report(report: dict) -> str:
    """A console table: one line per kind, deciles as the share of the kind in each tenth of the ranking."""
    kept = "kept" in report
    head = f"{'kind':<11}{'n':>7}  {'mean score':>10}  {'AUROC clean>kind':>16}" + (f"  {'kept':>6}" if kept else "")
    lines = [f"{head}  | share of the kind per rank decile (0 = best)",
             " " * len(head) + "  |" + "".join(f"{d:>5}" for d in range(N_DECILES))]
    for kind in report["n"].index:
        a = report["auroc"].get(kind)
        line = (f"{kind:<11}{int(report['n'][kind]):>7}  {report['mean_score'][kind]:>10.4f}  "
                + (f"{a:>16.3f}" if a is not None else f"{'-':>16}")
                + (f"  {report['kept'][kind]:>6.1%}" if kept else ""))
        shares = "".join(f"{s:>5.0%}" for s in report["deciles"].loc[kind])
        lines.append(f"{line}  |{shares}")
    return "\n".join(lines)
