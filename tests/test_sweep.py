"""The second benchmark (real digit scans with planted kinds) and the seed-sweep report."""
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from alchemist.ratings import read_ratings
from alchemist.target_blend import blend_with_target
from alchemist.selection import prune_table
from experiments.digits_data import WORDS, DigitsSpec, generate_digits
from experiments.planted import auroc
from experiments.sweep import run_sweep


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    generate_digits(out, DigitsSpec(seed=3))
    return out, pd.read_csv(out / "defects.csv", dtype={"id": str}, keep_default_na=False)


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_digits_split_counts_and_truth(digits):
    out, d = digits
    train, val = d[d["split"] == "train"], d[d["split"] == "val"]
    assert len(val) == 400 and len(train) == 1797 - 400 and set(val["kind"]) == {"clean"}
    assert not set(train["uci_index"]) & set(val["uci_index"])  # no scan is in both splits
    counts = train["kind"].value_counts()
    assert counts["plain"] == counts["noise"] == counts["misaligned"] == counts["blurred"] == round(0.1 * 1397)
    assert counts["duplicate"] == round(0.05 * 1397)
    assert list(pd.read_csv(out / "train.csv").columns) == ["id", "image_path", "caption"]


def test_digit_captions_name_the_digit_except_misaligned(digits):
    _, d = digits
    named = d[d["label"] >= 0]
    said = named["caption"].map(lambda c: next(i for i, w in enumerate(WORDS) if w in c.split(" ") or w + "," in c))
    right = said == named["label"]
    assert right[named["kind"] != "misaligned"].all()
    assert not right[named["kind"] == "misaligned"].any()


def test_duplicates_are_byte_copies_and_defects_look_as_planted(digits):
    out, d = digits
    ids = d.set_index("id")
    for _, r in d[d["kind"] == "duplicate"].head(10).iterrows():
        src = ids.loc[r["source_id"]]
        assert src["kind"] == "clean" and src["caption"] == r["caption"]
        assert _md5(out / f"images/{r['id']}.png") == _md5(out / f"images/{r['source_id']}.png")

    def pixels(kind):
        return np.stack([np.asarray(Image.open(out / f"images/{i}.png"), dtype=np.float64)
                         for i in d[d["kind"] == kind]["id"].head(20)])
    assert pixels("plain").std(axis=(1, 2, 3)).max() == 0.0  # a uniform page
    assert pixels("noise").std(axis=(1, 2, 3)).min() > 50  # random pixels
    clean, blurred = pixels("clean"), pixels("blurred")
    ratio = np.abs(np.diff(blurred, axis=2)).mean() / np.abs(np.diff(clean, axis=2)).mean()
    assert ratio < 0.8, ratio  # softer edges


def test_digits_same_seed_same_bytes(digits, tmp_path):
    out, _ = digits
    generate_digits(tmp_path, DigitsSpec(seed=3))
    assert _md5(tmp_path / "defects.csv") == _md5(out / "defects.csv")
    assert _md5(tmp_path / "images/train_00007.png") == _md5(out / "images/train_00007.png")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Two seeds of the whole pipeline at toy size."""
    out = tmp_path_factory.mktemp("sweep")
    args = ["--n-train", "64", "--n-val", "50", "--tokenizer-steps", "2", "--ep=1", "--bs=8", "--depth=1",
            "--raterDepth=1", "--text_max_len=16", "--num_workers=0", "--distill_steps=10",
            "--distill_proxy_steps=3", "--distill_captions=2"]
    return out, run_sweep("demo", [0, 1], out, jobs=2, args=args)


def test_sweep_report_matches_a_recomputation_from_each_seeds_ratings(swept):
    """The report's mean ± std equal AUROCs and keep rates recomputed here from each seed's own
    ratings, subset and truth."""
    tmp_path, table = swept
    rows = []
    for seed in (0, 1):
        d = tmp_path / f"seed{seed}"
        r = pd.read_parquet(d / "ratings.parquet")
        kept = set(pd.read_parquet(d / "subset_ratings.parquet")["id"].astype(str))
        trusted = pd.read_parquet(d / "val_ratings.parquet")  # the rater's scores of the 50 validation pairs
        assert len(trusted) == 50 and set(trusted["id"]) == set(pd.read_csv(d / "data/val.csv")["id"])
        assert kept == set(prune_table(read_ratings(d / "ratings.parquet"), "shift_gsample", 0.5, seed=seed,
                                       reference=trusted["score"].to_numpy())["id"].astype(str))
        truth = pd.read_csv(d / "data/defects.csv", dtype={"id": str}, keep_default_na=False).set_index("id")["kind"]
        r = r.assign(kind=r["id"].astype(str).map(truth))
        clean = r.loc[r["kind"] == "clean", "score"]
        taught = pd.read_parquet(d / "rater/distill_target.parquet")  # what the distilled rater was fitted to
        blended = read_ratings(d / "ratings.parquet")  # stage 4 ranks the run's own pairs with its target too
        raw = blended.assign(score=blended["rater_score"]).drop(columns="rater_score")
        assert blend_with_target(raw, taught)["id"].tolist() == blended["id"].tolist()
        taught = taught.assign(kind=taught["id"].map(truth))
        for kind in ("plain", "noise", "misaligned", "duplicate", "blurred"):
            part = r[r["kind"] == kind]
            rows.append({"seed": seed, "kind": kind, "auroc": auroc(clean, part["score"]),
                         "kept": part["id"].astype(str).isin(kept).mean(),
                         "target": auroc(taught.loc[taught["kind"] == "clean", "target"],
                                         taught.loc[taught["kind"] == kind, "target"])})
    mine = pd.DataFrame(rows).groupby("kind")
    for kind, r in table.iterrows():
        assert r["auroc_mean"] == pytest.approx(mine["auroc"].mean()[kind])
        assert r["auroc_std"] == pytest.approx(mine["auroc"].std(ddof=1)[kind])
        assert r["kept_mean"] == pytest.approx(mine["kept"].mean()[kind])
        assert r["target_auroc_mean"] == pytest.approx(mine["target"].mean()[kind])
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["seeds"] == [0, 1] and len(record["per_seed"]) == 10
    keeps = pd.DataFrame(record["strategy_keeps"])
    for kind, r in table.iterrows():  # the strategy table's default column is the pipeline's own subset
        assert keeps.loc[kind, "Shift-Gsample (default)"] == pytest.approx(r["kept_mean"])
    assert "± " in (tmp_path / "sweep.md").read_text()


def test_downstream_arms_at_equal_steps(swept, tmp_path):
    """Every arm × seed trains the same number of steps; the subsets are the selection rule's on the
    seed's own ratings; the report's numbers are the runs' mean ± std."""
    from alchemist.selection import select
    from experiments.downstream import run_downstream

    out, _ = swept
    table = run_downstream(out, "demo", [0, 1], epochs_full=1, jobs=2,
                           overrides=["--depth=1", "--bs=8", "--text_max_len=16", "--num_workers=0"])
    runs = pd.DataFrame(json.loads((out / "downstream.json").read_text())["runs"])
    assert set(runs["arm"]) == {"full", "random_50", "shift_gsample_50", "topk_50"} and len(runs) == 8
    assert runs["steps"].nunique() == 1  # 64 rows / 8 = 8 steps; 32 rows / 8 * 2 epochs = 8 steps
    assert (runs.loc[runs["arm"] == "full", "rows"] == 64).all() and (runs.loc[runs["arm"] != "full", "rows"] == 32).all()
    for seed in (0, 1):
        ratings = read_ratings(out / f"seed{seed}/ratings.parquet")
        top = set(ratings.iloc[select(ratings, "topk", 0.5)]["id"].astype(str))
        assert set(pd.read_csv(out / f"seed{seed}/downstream/topk_50/subset.csv", dtype={"id": str})["id"]) == top
        shift = pd.read_csv(out / f"seed{seed}/downstream/shift_gsample_50/subset.csv", dtype={"id": str})["id"]
        assert set(shift) == set(pd.read_parquet(out / f"seed{seed}/subset_ratings.parquet")["id"].astype(str))
    assert np.isfinite(runs["heldout_loss"]).all() and np.isfinite(runs["caption_gain"]).all()
    g = runs.groupby("arm")
    assert table["heldout_mean"].to_dict() == pytest.approx(g["heldout_loss"].mean().to_dict())
    assert table["heldout_std"].to_dict() == pytest.approx(g["heldout_loss"].std(ddof=1).to_dict())

    # the random arm does not depend on the ratings' order; a run on other rows is not reused
    from alchemist.ratings import write_ratings
    from experiments.downstream import run_arm, subset_table
    seed0 = out / "seed0"
    ratings = read_ratings(seed0 / "ratings.parquet")
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    other = ratings.drop(columns=["rank"]).assign(score=np.random.default_rng(3).normal(size=len(ratings)))
    write_ratings(other, shuffled / "ratings.parquet")  # another rater's ranking of the same rows
    for name in ("random_50", "full"):
        assert subset_table(shuffled, name, 0)["id"].tolist() == subset_table(seed0, name, 0)["id"].tolist()
    assert subset_table(shuffled, "topk_50", 0)["id"].tolist() != subset_table(seed0, "topk_50", 0)["id"].tolist()
    arm = seed0 / "downstream/topk_50"
    stale = pd.read_csv(arm / "subset.csv", dtype={"id": str}).iloc[:-1]
    stale.to_csv(arm / "subset.csv", index=False)
    before = (arm / "summary.json").stat().st_mtime_ns
    run_arm(str(seed0), "topk_50", 0, 1, ["--depth=1", "--bs=8", "--text_max_len=16", "--num_workers=0"],
            "configs/demo_t2i.json")
    assert (arm / "summary.json").stat().st_mtime_ns > before
    assert set(pd.read_csv(arm / "subset.csv", dtype={"id": str})["id"]) == set(
        ratings.iloc[select(ratings, "topk", 0.5)]["id"].astype(str))


def test_trace_frame_z_scores_and_spans():
    from experiments.trace import per_span, trace_frame

    records = [{"step": 0, "gamma": 1.0, "ids": ["a", "b", "c"], "a": np.zeros(3), "logit": np.array([1.0, 2, 3])},
               {"step": 1, "gamma": 0.9, "ids": ["a", "b", "c"], "a": np.array([1.0, 2, 6]),
                "logit": np.array([0.0, 0, 0])},
               {"step": 2, "gamma": 0.8, "ids": ["c", "a", "b"], "a": np.array([3.0, -1, 1]),
                "logit": np.array([2.0, 1, 0])}]
    kinds = pd.Series({"a": "clean", "b": "clean", "c": "noise"})
    df = trace_frame(records, kinds)
    assert sorted(df["step"].unique()) == [1, 2]  # the γ = 1 step taught nothing and is left out
    z1 = (np.array([1.0, 2, 6]) - 3) / np.array([1.0, 2, 6]).std()
    np.testing.assert_allclose(df[df["step"] == 1]["a_z"], z1)
    assert (df[df["step"] == 1]["logit_z"] == 0).all()  # no spread: zeros, not NaN
    table = per_span(df, "a_z", 2)
    assert list(table.columns) == ["clean", "noise"] and len(table) == 2
    assert table["noise"].iloc[0] == pytest.approx(z1[2])
    assert table["noise"].iloc[1] == pytest.approx(2 / np.array([3.0, -1, 1]).std())
