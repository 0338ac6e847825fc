"""Planted-defect report: AUROC against brute force, deciles and kept shares where the answer is known."""
import itertools

import numpy as np
import pandas as pd
import pytest

from alchemist.ratings import rank_scores
from experiments.demo_data import DemoSpec, generate_demo
from experiments.planted import auroc, format_kind_report, kind_report


def brute_auroc(pos, neg):
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    return sum(wins) / len(wins)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    pos, neg = rng.integers(0, 6, rng.integers(1, 30)), rng.integers(0, 6, rng.integers(1, 30))  # many ties
    assert auroc(pos, neg) == pytest.approx(brute_auroc(pos, neg), abs=1e-12)


def test_auroc_extremes_and_errors():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0 and auroc([1, 1], [1]) == 0.5
    with pytest.raises(ValueError, match="both sides"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auroc([np.nan], [1.0])


def _synthetic(n_per_kind, scores_for, seed=0):
    """Ratings + defects with ``n_per_kind[k]`` rows of kind k scored by ``scores_for(kind, n, rng)``."""
    rng = np.random.default_rng(seed)
    kinds = np.concatenate([[k] * n for k, n in n_per_kind.items()])
    score = np.concatenate([scores_for(k, n, rng) for k, n in n_per_kind.items()])
    ids = [f"p{i:05d}" for i in rng.permutation(len(kinds))]
    defects = pd.DataFrame({"id": ids, "split": "train", "kind": kinds})
    return rank_scores(pd.DataFrame({"id": ids, "score": score})), defects


def test_noise_scored_lowest_lands_in_the_last_decile():
    counts = {"clean": 60, "plain": 20, "noise": 10, "blurred": 10}
    ratings, defects = _synthetic(counts, lambda k, n, rng: rng.normal(size=n) - (100 if k == "noise" else 0))
    rep = kind_report(ratings, defects)
    assert rep["auroc"]["noise"] == 1.0 and set(rep["auroc"].index) == {"plain", "noise", "blurred"}
    assert rep["deciles"].loc["noise", 9] == 1.0 and rep["deciles"].loc["noise", :8].sum() == 0.0
    np.testing.assert_allclose(rep["deciles"].sum(axis=1), 1.0)  # each kind's row sums to 1
    assert list(rep["n"].index) == ["clean", "plain", "noise", "blurred"] and rep["n"].to_dict() == counts
    joined = ratings.merge(defects, on="id")
    np.testing.assert_allclose(rep["mean_score"], joined.groupby("kind")["score"].mean()[rep["n"].index])
    assert "kept" not in rep


def test_random_scores_give_auroc_near_half_and_flat_deciles():
    counts = {"clean": 2000, "noise": 1000, "duplicate": 1000}
    ratings, defects = _synthetic(counts, lambda k, n, rng: rng.normal(size=n), seed=1)
    rep = kind_report(ratings, defects)
    assert all(abs(a - 0.5) < 0.04 for a in rep["auroc"])
    assert (rep["deciles"] - 0.1).abs().to_numpy().max() < 0.05


def test_kept_fraction_per_kind_and_errors():
    counts = {"clean": 30, "misaligned": 10}
    ratings, defects = _synthetic(counts, lambda k, n, rng: rng.normal(size=n) + (5 if k == "clean" else 0))
    top = ratings["id"].iloc[:30]  # all clean rows rank first
    rep = kind_report(ratings, defects, selected_ids=top)
    assert rep["kept"].to_dict() == {"clean": 1.0, "misaligned": 0.0}
    with pytest.raises(ValueError, match="not in the ratings"):
        kind_report(ratings, defects, selected_ids=["nope"])
    with pytest.raises(ValueError, match="not in the defects"):
        kind_report(ratings, defects.iloc[1:])


def test_report_on_demo_defects_and_formatting(tmp_path):
    """The demo's own defects.csv (train and val rows) against ratings of the train split only."""
    generate_demo(tmp_path, DemoSpec(n_train=40, n_val=4, image_size=16, seed=0))
    defects = pd.read_csv(tmp_path / "defects.csv", dtype=str, keep_default_na=False)
    train = defects[defects["split"] == "train"]
    score = np.where(train["kind"] == "clean", 1.0, 0.0) + np.linspace(0, 0.1, len(train))
    ratings = rank_scores(pd.DataFrame({"id": train["id"], "score": score}))
    rep = kind_report(ratings, defects, selected_ids=ratings["id"].iloc[:20])
    assert (rep["auroc"] == 1.0).all() and rep["n"].sum() == 40
    text = format_kind_report(rep)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rep["n"]) and len({line.index("|") for line in lines}) == 1
    assert lines[2].startswith("clean") and "1.000" in text and "kept" in lines[0]
