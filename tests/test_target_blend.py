"""The rater's ranking averaged with its distillation target: the order against a brute-force mean of
percentile ranks, the scores (and so the junk estimate) unchanged, and each signal's strength kept."""
import numpy as np
import pandas as pd
import pytest

from alchemist.data.pairs import DataError
from alchemist.selection import junk_ceiling
from alchemist.target_blend import TARGET_WEIGHT, blend_with_target
from experiments.planted import auroc


def tables(rater, target, ids=None):
    ids = [f"p{i:03d}" for i in range(len(rater))] if ids is None else ids
    return (pd.DataFrame({"id": ids, "score": rater, "caption": ["c"] * len(ids)}),
            pd.DataFrame({"id": ids[::-1], "target": np.asarray(target)[::-1]}))  # another row order


def pct(x):
    """Brute-force percentile ranks, ties averaged (pandas' ``rank(pct=True)``)."""
    return np.array([(np.sum(x < v) + (np.sum(x == v) + 1) / 2) / len(x) for v in x])


def test_order_is_the_weighted_mean_percentile_rank_and_the_scores_are_the_raters():
    rng = np.random.default_rng(0)
    rater, target = rng.normal(size=40), rng.normal(size=40)
    out = blend_with_target(*tables(rater, target))
    mean = (1 - TARGET_WEIGHT) * pct(rater) + TARGET_WEIGHT * pct(target)
    want = sorted(range(40), key=lambda i: (-mean[i], -rater[i], f"p{i:03d}"))
    assert out["id"].tolist() == [f"p{i:03d}" for i in want]
    assert out["rank"].tolist() == list(range(40))
    assert np.array_equal(out["score"].to_numpy(), np.sort(rater)[::-1])  # the rater's scores, best first
    assert np.array_equal(out.set_index("id").loc[[f"p{i:03d}" for i in range(40)], "rater_score"], rater)
    assert out["caption"].eq("c").all()
    ref = rng.normal(size=100)
    assert junk_ceiling(out["score"].to_numpy(), ref) == junk_ceiling(rater, ref)
    again = blend_with_target(out, tables(rater, target)[1])  # blending a blended table changes nothing
    assert again["id"].tolist() == out["id"].tolist() and np.array_equal(again["score"], out["score"])


@pytest.mark.parametrize("weight", [0.0, 0.25, 0.75, 1.0])
def test_the_weight_is_the_targets_share_of_the_mean(weight):
    rng = np.random.default_rng(2)
    rater, target = rng.normal(size=50), rng.integers(0, 8, size=50).astype(float)  # a target with ties
    out = blend_with_target(*tables(rater, target), weight=weight)
    mean = (1 - weight) * pct(rater) + weight * pct(target)
    want = sorted(range(50), key=lambda i: (-round(mean[i], 12), -rater[i], f"p{i:03d}"))
    assert out["id"].tolist() == [f"p{i:03d}" for i in want]
    if weight == 0.0:  # the rater's own order
        assert out["id"].tolist() == [f"p{i:03d}" for i in np.argsort(-rater, kind="stable")]
    assert np.array_equal(out["score"].to_numpy(), np.sort(rater)[::-1])
    with pytest.raises(ValueError, match="weight"):
        blend_with_target(*tables(rater, target), weight=1.5)


def test_a_target_in_the_raters_order_changes_nothing_and_ties_fall_to_the_rater():
    rater = np.array([0.3, 2.0, -1.0, 0.5, 1.1])
    out = blend_with_target(*tables(rater, 10 * rater + 1))
    assert out["id"].tolist() == ["p001", "p004", "p003", "p000", "p002"]
    assert np.array_equal(out["score"], np.sort(rater)[::-1])
    flat = blend_with_target(*tables(rater, np.zeros(5)))  # a constant target ties every row: the rater decides
    assert flat["id"].tolist() == out["id"].tolist()


def test_each_signal_keeps_the_defect_it_finds():
    """The rater finds kind A and not B, the target B and not A: the blend finds both."""
    rng = np.random.default_rng(1)
    n = 600
    kind = np.repeat(["clean", "a", "b"], [400, 100, 100])
    rater = rng.normal(size=n) - 3 * (kind == "a")
    target = rng.normal(size=n) - 3 * (kind == "b")
    k = dict(zip([f"p{i:03d}" for i in range(n)], kind))

    def found(weight):
        out = blend_with_target(*tables(rater, target), weight=weight)
        s = out.assign(kind=out["id"].map(k))
        return {x: auroc(s.loc[s.kind == "clean", "score"], s.loc[s.kind == x, "score"]) for x in ("a", "b")}

    even, leaning = found(0.5), found(0.75)
    assert even["a"] > 0.8 and even["b"] > 0.8  # each alone: about 0.5 on the kind the other finds
    assert leaning["b"] > even["b"] and 0.6 < leaning["a"] < even["a"]  # more weight: more of the target's kind
    assert max(auroc(rater[kind == "clean"], rater[kind == "b"]), auroc(target[kind == "clean"], target[kind == "a"])) < 0.6


def test_rated_rows_without_a_target_are_an_error():
    ratings, target = tables(np.arange(5.0), np.arange(5.0))
    with pytest.raises(DataError, match="no distillation target"):
        blend_with_target(ratings, target.iloc[1:])
