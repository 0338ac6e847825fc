"""Pruning strategies (alchemist.selection), ratings tables (alchemist.ratings), scripts/prune.py."""
import importlib.util
import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from alchemist.ratings import rank_scores, read_ratings, read_table, write_ratings
from alchemist.selection import (STRATEGIES, default_shift, inclusion_probability, junk_ceiling, junk_share,
                                 prune_table, rank_histogram, resolve_params, select)

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("shift_gsample", "gsample", "random")


# ----------------------------------------------------------------------------- counts, determinism
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("retention,k", [(0.2, 200), (0.9, 900), (1.0, 1000), (137, 137), (1, 1)])
def test_exact_count_no_duplicates_deterministic(strategy, retention, k):
    idx = select(1000, strategy, retention, seed=3)
    assert len(idx) == k and len(np.unique(idx)) == k
    assert idx.min() >= 0 and idx.max() < 1000
    assert np.all(np.diff(idx) > 0), "rank positions come back best first"
    np.testing.assert_array_equal(idx, select(1000, strategy, retention, seed=3))


@pytest.mark.parametrize("strategy", SAMPLERS)
def test_seed_changes_the_sample(strategy):
    assert not np.array_equal(select(1000, strategy, 0.2, seed=0), select(1000, strategy, 0.2, seed=1))


def test_every_retention_feasible_with_default_shift():
    for n in (10, 37, 1000):
        for k in range(1, n + 1):
            assert len(select(n, "shift_gsample", k, seed=k)) == k


def test_default_shift_follows_the_paper():
    assert default_shift(0.2) == default_shift(0.5) == 0.25
    assert default_shift(0.8) == pytest.approx(0.15) and default_shift(0.9) == pytest.approx(0.05)
    assert default_shift(1.0) == 0.0


# ----------------------------------------------------------------------------- deterministic strategies
def test_topk_bottomk_block_exact():
    np.testing.assert_array_equal(select(100, "topk", 0.2), np.arange(20))
    np.testing.assert_array_equal(select(100, "bottomk", 7), np.arange(93, 100))
    np.testing.assert_array_equal(select(100, "block", 0.2, start=0.3), np.arange(30, 50))
    np.testing.assert_array_equal(select(100, "block", 0.2), np.arange(40, 60))  # default start 0.4
    np.testing.assert_array_equal(select(100, "block", 0.8), np.arange(20, 100))  # default slides left
    with pytest.raises(ValueError, match="start <= 0.2"):
        select(100, "block", 0.8, start=0.3)


def test_scores_and_tables_map_back_to_rows():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.3])
    np.testing.assert_array_equal(select(scores, "topk", 3), [1, 3, 2])  # ties: row order
    df = pd.DataFrame({"id": list("abcde"), "rank": [3, 0, 4, 1, 2]})
    np.testing.assert_array_equal(select(df, "topk", 2), [1, 3])
    np.testing.assert_array_equal(select(df, "bottomk", 1), [2])
    with pytest.raises(ValueError, match="permutation"):
        select(df.assign(rank=[0, 0, 1, 2, 3]), "topk", 1)


# ----------------------------------------------------------------------------- shift-gsample distribution
def test_shift_gsample_never_picks_the_head_or_the_tail():
    for seed in range(5):
        pos = select(1000, "shift_gsample", 0.5, seed=seed)  # no scores: default shift 0.25, tail 0.15
        assert pos.min() >= 250 and pos.max() < 850
        pos = select(1000, "shift_gsample", 0.2, seed=seed, shift=0.4)
        assert pos.min() >= 400 and pos.max() < 850
        pos = select(1000, "shift_gsample", 0.3, seed=seed, shift=0.1, tail=0.5)
        assert pos.min() >= 100 and pos.max() < 500
    # 80 %: the tail keeps its 0.15 and the shift shrinks from the paper's 0.15 to what is left
    assert np.array_equal(select(1000, "shift_gsample", 0.8, seed=0), np.arange(50, 850))


def test_default_parameters_follow_the_written_rule():
    """tail = max(0.15, the junk ceiling against trusted scores), 0.15 without them; shift = the
    paper's, shrunk to fit; the Gaussian centred on the support with ±2σ spanning it."""
    rng = np.random.default_rng(0)
    trusted = rng.normal(size=2000)
    clean = rng.normal(size=10_000)
    assert junk_ceiling(clean, trusted) < 0.06  # nothing below the trusted pairs: the paper's tail
    for scores, ref in ((clean, trusted), (clean, None), (None, trusted)):
        assert resolve_params("shift_gsample", 10_000, 0.5, scores, ref) == pytest.approx(
            {"mu": 0.55, "sigma": 0.15, "shift": 0.25, "tail": 0.15})
    junk = np.r_[rng.normal(size=8000), rng.normal(-6, 1, 2000)]  # 20 % far below the trusted pairs
    assert junk_share(junk, trusted) == pytest.approx(0.2, abs=0.03)
    assert junk_ceiling(junk, trusted) == pytest.approx(2 * junk_share(junk, trusted))
    p = resolve_params("shift_gsample", 10_000, 0.5, junk, trusted)
    assert p["tail"] == pytest.approx(junk_ceiling(junk, trusted), abs=1e-4)  # in whole rows
    assert p["shift"] == pytest.approx(1 - p["tail"] - 0.5) and p["shift"] < 0.25  # the shift yields
    assert p["mu"] == pytest.approx((p["shift"] + 1 - p["tail"]) / 2)
    assert p["sigma"] == pytest.approx((1 - p["tail"] - p["shift"]) / 4)
    assert (select(junk, "shift_gsample", 0.5, seed=0, reference=trusted) >= 8000).sum() == 0  # none sampled
    assert (select(junk, "shift_gsample", 0.5, seed=0) >= 8000).sum() > 0.1 * 2000  # without it: 0.8-0.85 sampled
    # junk above 1 - retention is cut only as far as K still fits, and the shift goes first: Top-K
    heavy = np.r_[rng.normal(size=700), np.full(300, -9.0)]
    p = resolve_params("shift_gsample", 1000, 0.5, heavy, trusted)
    assert p["tail"] == pytest.approx(0.5) and p["shift"] == 0.0
    assert set(select(heavy, "shift_gsample", 0.5, seed=3, reference=trusted)) == set(select(heavy, "topk", 0.5))
    assert resolve_params("shift_gsample", 1000, 0.5, junk[:1000], trusted, tail=0.1, mu=0.3)["mu"] == 0.3


def test_junk_ceiling_bounds_junk_the_rater_half_finds():
    """Storey's floor measures π(1 − 2q) for a junk share π of which q scores above the trusted median;
    the ceiling recovers π when q = ¼ (a shift of Φ⁻¹(¾) between equal-variance Gaussians), stays
    above π for any junk found better, and is capped at 1."""
    rng = np.random.default_rng(2)
    trusted = rng.normal(size=20_000)
    d_quarter = 0.6744897501960817  # P(N(−d, 1) > 0) = ¼
    for share in (0.1, 0.3):
        n_junk = int(share * 100_000)
        scores = np.r_[rng.normal(size=100_000 - n_junk), rng.normal(-d_quarter, 1, n_junk)]
        assert junk_share(scores, trusted) == pytest.approx(share / 2, abs=0.01)  # the floor: half of it
        assert junk_ceiling(scores, trusted) == pytest.approx(share, abs=0.02)
        far = np.r_[rng.normal(size=100_000 - n_junk), rng.normal(-3, 1, n_junk)]
        assert share < junk_ceiling(far, trusted) <= 2 * share + 0.02
    assert junk_ceiling(np.full(100, -5.0), trusted) == 1.0


def test_junk_share_is_storeys_estimate_at_the_trusted_median():
    """Brute force on ties, and against the closed form 1 − 2·P(score > median) for Gaussian mixtures:
    the estimate moves smoothly with the separation of the junk (no threshold to fall off)."""
    trusted = np.r_[np.zeros(25), np.full(25, 3.0), np.full(10, 9.0)]  # median 3
    s = np.array([0, 0, 1, 2, 3, 3, 3, 4.0])  # above the median: 1, tied: 3 (count half)
    assert junk_share(s, trusted) == pytest.approx(1 - 2 * (1 + 1.5) / 8)
    assert junk_share(np.full(8, 5.0), trusted) == 0.0  # capped: never a negative share
    rng = np.random.default_rng(1)
    trusted = rng.normal(size=20_000)
    estimates = []
    for d in (0.0, 0.5, 1.0, 2.0, 4.0):
        scores = np.r_[rng.normal(size=70_000), rng.normal(-d, 1, 30_000)]
        expected = 1 - 2 * (0.7 * 0.5 + 0.3 * 0.5 * math.erfc(d / math.sqrt(2)))
        estimates.append(junk_share(scores, trusted))
        assert estimates[-1] == pytest.approx(expected, abs=0.015)
    assert np.all(np.diff(estimates) > 0)
    with pytest.raises(ValueError, match="at least 50"):
        junk_share(s, np.zeros(49))
    with pytest.raises(ValueError, match="not finite"):
        junk_share(s, np.r_[np.zeros(60), np.nan])


def _binned_gaussian(n, head, mu, sigma, edges, end=None):
    pos = np.arange(head, end or n) / n
    w = np.exp(-((pos - mu) ** 2) / (2 * sigma**2))
    return np.array([w[(pos >= a) & (pos < b)].sum() for a, b in zip(edges[:-1], edges[1:])])


def test_shift_gsample_matches_truncated_gaussian_when_k_much_smaller_than_n():
    n, k = 200_000, 2000  # K << N: without-replacement inclusion ≈ proportional to the density
    pos = select(n, "shift_gsample", k, seed=0) / n
    assert pos.min() >= 0.25 and pos.max() < 0.85  # no scores: the default tail 0.15
    edges = np.linspace(0.25, 0.85, 13)
    observed = np.histogram(pos, edges)[0]
    expected = _binned_gaussian(n, 50_000, 0.55, 0.15, edges, end=170_000)
    keep = expected / expected.sum() * k >= 5  # chi-square needs enough expected counts per bin
    exp_ = expected[keep] / expected[keep].sum() * observed[keep].sum()
    assert stats.chisquare(observed[keep], exp_).pvalue > 0.01
    # ... and the same test has the power to reject a Gaussian centred 0.05 away.
    wrong = _binned_gaussian(n, 50_000, 0.60, 0.15, edges, end=170_000)[keep]
    assert stats.chisquare(observed[keep], wrong / wrong.sum() * observed[keep].sum()).pvalue < 1e-6


def test_large_retention_matches_inclusion_probability():
    n = 200_000  # K = N/2: the histogram is no longer the density but the inclusion probability
    for strategy in ("gsample", "shift_gsample"):
        hist = rank_histogram(select(n, strategy, 0.5, seed=1), n, bins=20)
        expected = np.add.reduceat(inclusion_probability(n, strategy, 0.5), np.arange(0, n, n // 20))
        assert expected.sum() == pytest.approx(n / 2)
        np.testing.assert_allclose(hist, expected, atol=4 * np.sqrt(expected.max()) + 1)


def test_without_replacement_sampler_equals_sequential_draws():
    n, k, mu, sigma = 5, 2, 0.2, 0.3
    w = np.exp(-((np.arange(n) / n - mu) ** 2) / (2 * sigma**2))
    p = w / w.sum()
    pairs = list(itertools.combinations(range(n), k))
    # Exact set probabilities of two sequential draws without replacement.
    exact = np.array([p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) for i, j in pairs])
    trials = 20_000
    counts = dict.fromkeys(pairs, 0)
    for seed in range(trials):
        counts[tuple(select(n, "gsample", k, seed=seed, mu=mu, sigma=sigma))] += 1
    observed = np.array([counts[q] for q in pairs])
    assert stats.chisquare(observed, exact * trials).pvalue > 0.01
    # A with-replacement-style (independent) pair law is distinguishable at this sample size.
    naive = np.array([p[i] * p[j] for i, j in pairs])
    assert stats.chisquare(observed, naive / naive.sum() * trials).pvalue < 1e-6


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="topk", retention=0), "retention"),
    (dict(strategy="topk", retention=0.0), "retention"),
    (dict(strategy="topk", retention=1.5), "retention"),
    (dict(strategy="topk", retention=101), "between 1 and N=100"),
    (dict(strategy="topk", retention=True), "retention"),
    (dict(strategy="top_k", retention=0.5), "unknown strategy 'top_k'"),
    (dict(strategy="topk", retention=0.5, mu=0.5), "takes no parameter 'mu'"),
    (dict(strategy="gsample", retention=0.5, sigma=0.0), "sigma > 0"),
    (dict(strategy="shift_gsample", retention=0.5, shift=0.6), "lower the shift"),
    (dict(strategy="shift_gsample", retention=0.5, shift=1.0), r"\[0, 1\)"),
])
def test_bad_input_is_a_clear_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select(100, seed=0, **kwargs)


# ----------------------------------------------------------------------------- ratings tables
def _pairs(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "id": [f"{i:04d}" for i in range(n)],
        "image_save_path": [f"/data/{i}.jpg" for i in range(n)],
        "caption": ["NA" if i == 3 else f"caption {i}, with comma" for i in range(n)],
        "score": rng.normal(size=n).round(2),  # rounding makes ties
    })


def test_rank_scores_sorts_and_breaks_ties_by_id():
    df = pd.DataFrame({"id": ["b", "a", "c", "d"], "score": [1.0, 1.0, 2.0, 0.5]})
    out = rank_scores(df)
    assert list(out["id"]) == ["c", "a", "b", "d"] and list(out["rank"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="non-numeric score"):
        rank_scores(df.assign(score=[1.0, np.nan, 2.0, 0.5]))


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_ratings_round_trip(tmp_path, ext):
    ranked = rank_scores(_pairs())
    path = write_ratings(_pairs(), tmp_path / f"r.{ext}")
    back = read_ratings(path)
    assert list(back.columns) == list(ranked.columns)
    assert list(back["id"]) == list(ranked["id"])  # "0007" stays text, order identical
    assert back["caption"].iloc[int(np.flatnonzero(back["id"] == "0003")[0])] == "NA"
    np.testing.assert_array_equal(back["score"].to_numpy(), ranked["score"].to_numpy())
    np.testing.assert_array_equal(back["rank"].to_numpy(), np.arange(50))
    assert not list(tmp_path.glob(".*tmp")), "no temp file left behind"


def test_read_ratings_sorts_by_rank_and_validates(tmp_path):
    ranked = rank_scores(_pairs())
    ranked.sample(frac=1, random_state=0).to_csv(tmp_path / "shuffled.csv", index=False)
    np.testing.assert_array_equal(read_ratings(tmp_path / "shuffled.csv")["rank"], np.arange(50))
    ranked.drop(columns="rank").to_csv(tmp_path / "norank.csv", index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['rank'\]"):
        read_ratings(tmp_path / "norank.csv")
    ranked.assign(rank=0).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="permutation"):
        read_ratings(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="name the file .csv or .parquet"):
        read_ratings(tmp_path / "r.json")


def test_ratings_with_nan_scores_or_repeated_ids_are_refused(tmp_path):
    """A ranked file whose scores are NaN, or whose ids repeat, is not pruned into a subset."""
    ranked = rank_scores(_pairs())
    ranked.assign(score=np.nan).to_csv(tmp_path / "nan.csv", index=False)
    with pytest.raises(ValueError, match="NaN or infinite"):
        read_ratings(tmp_path / "nan.csv")
    ranked.assign(id=["x"] + ranked["id"].tolist()[1:-1] + ["x"]).to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="more than once.*'x'"):
        read_ratings(tmp_path / "dup.parquet")


def test_prune_table_keeps_rank_order_and_columns():
    ratings = rank_scores(_pairs())
    sub = prune_table(ratings, "shift_gsample", 0.2, seed=0)
    assert list(sub.columns) == ["id", "image_save_path", "caption"] and len(sub) == 10
    ranks = ratings.set_index("id").loc[sub["id"], "rank"].to_numpy()
    assert np.all(np.diff(ranks) > 0) and ranks.min() >= 13 and ranks.max() < 43  # shift 0.25, tail 0.15 of 50


def test_prune_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prune_cli", ROOT / "scripts/prune.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    write_ratings(_pairs(200), tmp_path / "r.parquet")
    args = ["--ratings", str(tmp_path / "r.parquet"), "--out", str(tmp_path / "sub.csv"),
            "--strategy", "block", "--retention", "25%", "--start", "0.5"]
    assert cli.main(args) == 0
    assert "kept 50 of 200 rows" in capsys.readouterr().out
    sub = read_table(tmp_path / "sub.csv")
    assert list(sub.columns) == ["id", "image_save_path", "caption"]
    assert list(sub["id"]) == list(rank_scores(_pairs(200))["id"][100:150])
    assert cli.main(args[:-2] + ["--shift", "0.1"]) == 2
    assert "takes no parameter 'shift'" in capsys.readouterr().err


def test_plots_write_pngs(tmp_path):
    from PIL import Image

    from alchemist.plots import plot_rank_bands, plot_selection

    ratings = rank_scores(_pairs(40))
    for i in range(len(ratings)):
        ratings.loc[i, "image_save_path"] = f"img{i}.png"
        if i % 7:  # some images missing: they become grey tiles, not errors
            Image.new("RGB", (40, 30), (i * 6, 90, 200)).save(tmp_path / f"img{i}.png")
    for strategy in ("shift_gsample", "topk"):
        out = plot_selection(ratings, strategy, 0.5, tmp_path / f"sel_{strategy}.png")
        assert Image.open(out).size[0] > 600
    out = plot_rank_bands(ratings, tmp_path / "bands.png", k=3, bands=5, base_dir=tmp_path)
    assert Image.open(out).size[1] > Image.open(out).size[0]
    with pytest.raises(ValueError, match="no image column"):
        plot_rank_bands(ratings.drop(columns="image_save_path"), tmp_path / "x.png")
