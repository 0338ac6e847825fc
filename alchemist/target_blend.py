"""The rater's ranking of its own run's training pairs, averaged with the distillation target it
was fitted to (``rater/distill_target.parquet``, `docs/bilevel.md`).

The target ranks wrong captions better than the rater fitted to it, and the rater ranks blank
images better than the target (`docs/results.md`); a weighted mean of the two percentile ranks keeps
both (``weight``: the target's share). The target exists only for the pairs the run trained on, so
this applies to those alone.
The blended order is written onto the rater's own scores (row of blended rank i gets the rater's
i-th best score): the scores, and so Shift-Gsample's junk estimate against the rater's validation
scores, are unchanged; only the order moves. The rater's score stays in ``rater_score``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from alchemist.data.pairs import DataError
from alchemist.ratings import rank_scores, read_ratings, write_ratings

TARGET_WEIGHT = 0.75  # the target's share of the blend: 0.75 adopted on fresh seeds (docs/results.md)


def blend_with_target(ratings: pd.DataFrame, target: pd.DataFrame, weight: float = TARGET_WEIGHT) -> pd.DataFrame:
    """``ratings`` (id, score, ...) re-ordered by ``weight`` × the percentile rank of ``target`` (id,
    target) + (1 − ``weight``) × that of the rater's score; ties by the rater's score, then id. Returns a
    ranked ratings table. Idempotent: a table blended before keeps its ``rater_score``, which is what
    is blended again."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the target's weight in the blend must lie in [0, 1], got {weight}")
    ids = ratings["id"].astype(str)
    by_id = target.assign(id=target["id"].astype(str)).set_index("id")["target"]
    missing = ~ids.isin(by_id.index)
    if missing.any():
        raise DataError(f"{int(missing.sum())} rated ids have no distillation target (first: "
                        f"{ids[missing].iloc[0]!r}); it covers only the training pairs of the run that wrote it")
    rater = pd.to_numeric(ratings["rater_score" if "rater_score" in ratings else "score"]).to_numpy(np.float64)
    tgt = by_id.reindex(ids).to_numpy(np.float64)
    blend = ((1 - weight) * pd.Series(rater).rank(pct=True) + weight * pd.Series(tgt).rank(pct=True)).to_numpy()
    blend = blend.round(12)  # equal means that float error split are ties, which the rater decides
    order = np.lexsort((ids.to_numpy(), -rater, -blend))  # best first
    score = np.empty_like(rater)
    score[order] = np.sort(rater)[::-1]
    return rank_scores(ratings.assign(rater_score=rater, score=score))


def blend_file(ratings_path: str | Path, target_path: str | Path, weight: float = TARGET_WEIGHT) -> Path:
    """The ratings file at ``ratings_path`` blended, in place, with a run's ``distill_target.parquet``."""
    target_path = Path(target_path)
    if not target_path.is_file():
        raise FileNotFoundError(f"distillation target {str(target_path)!r} does not exist; it is written by a "
                                "rater run with the distillation stage (<run>/distill_target.parquet)")
    target = pd.read_parquet(target_path, columns=["id", "target"])
    blended = blend_with_target(read_ratings(ratings_path), target, weight)
    return write_ratings(blended, ratings_path)
