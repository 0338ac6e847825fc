"""Streaming rank and pruning over per-shard ratings equal the in-memory ranking and prune_table."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from alchemist.rank_stream import StreamRanker, prune_stream, ratings_files
from alchemist.ratings import rank_scores, write_ratings
from alchemist.selection import prune_table, resolve_params
from alchemist.utils.errors import UserError


@pytest.fixture
def shards(tmp_path):
    """600 rated rows in 4 shard files like scoring writes (row, id, score, official_score, skipped),
    with skipped rows and many tied scores; plus the in-memory ranking of the same rows."""
    rng = np.random.default_rng(0)
    n = 600
    ids = np.array([f"{x:032x}" for x in rng.integers(0, 2**62, n)])
    score = np.round(rng.standard_normal(n), 1)  # ~60 distinct values: ties everywhere
    skipped = np.where(rng.random(n) < 0.05, "unreadable image", "")
    score[skipped != ""] = np.nan
    root = tmp_path / "ratings.parquet.shards"
    root.mkdir()
    for k, lo in enumerate(range(0, n, 150)):
        sl = slice(lo, lo + 150)
        pd.DataFrame({"row": np.arange(n)[sl], "id": ids[sl], "score": score[sl], "official_score": score[sl],
                      "skipped": skipped[sl]}).to_parquet(root / f"shard_{k:05d}.parquet", index=False)
    (root / "meta.json").write_text("{}")
    ok = skipped == ""
    ref = rank_scores(pd.DataFrame({"id": ids[ok], "score": score[ok]}))
    return root, ref


def test_stream_rank_equals_in_memory_rank(shards):
    root, ref = shards
    for chunk_rows in (7, 1000):
        ranker = StreamRanker(ratings_files(root), chunk_rows=chunk_rows)
        got = {}
        for c in ranker.ranked():
            got.update(zip(c.ids.to_pylist(), c.rank.tolist()) if c.valid.all() else
                       ((i, r) for i, r, v in zip(c.ids.to_pylist(), c.rank.tolist(), c.valid) if v))
            assert (c.rank[~c.valid] == -1).all()
        assert ranker.n == len(ref) and got == dict(zip(ref["id"], ref["rank"]))


@pytest.mark.parametrize("strategy,params", [("topk", {}), ("bottomk", {}), ("block", {"start": 0.3}),
                                             ("random", {}), ("gsample", {}), ("shift_gsample", {}),
                                             ("shift_gsample", {"shift": 0.1, "tail": 0.2}),
                                             ("shift_gsample", {"reference": "top third"})])
def test_stream_prune_keeps_what_prune_table_keeps(shards, tmp_path, strategy, params):
    root, ref = shards
    if "reference" in params:  # trusted scores at the top: most rows count as junk, the tail is wide
        params = {"reference": np.sort(ref["score"].to_numpy())[-200:]}
        assert resolve_params(strategy, len(ref), 0.3, ref["score"].to_numpy(), **params)["tail"] > 0.5
    expect = prune_table(ref, strategy, 0.3, seed=3, keep_scores=True, **params)
    out = prune_stream(ratings_files(root), strategy, 0.3, seed=3, out=tmp_path / "kept.parquet",
                       keep_dir=tmp_path / "keep", chunk_rows=64, **params)
    kept = pd.read_parquet(tmp_path / "kept.parquet")
    assert kept["id"].tolist() == expect["id"].tolist() and kept["rank"].tolist() == expect["rank"].tolist()
    assert out["kept"] == len(expect) and out["n"] == len(ref)
    # per-shard keep column: same files, every input row, the kept ones flagged
    flagged = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "keep").glob("*.parquet"))])
    assert len(flagged) == 600 and sorted(flagged.loc[flagged["keep"], "id"]) == sorted(expect["id"])
    assert (flagged.loc[flagged["skipped"] != "", "rank"] == -1).all()
    assert set(flagged.columns) == {"row", "id", "score", "official_score", "skipped", "rank", "keep"}


def test_npy_subset_is_sorted_datacomp_uids(shards, tmp_path):
    root, ref = shards
    prune_stream(ratings_files(root), "topk", 100, out=tmp_path / "subset.npy")
    arr = np.load(tmp_path / "subset.npy")
    assert arr.dtype == np.dtype("u8,u8") and len(arr) == 100
    hexes = sorted(ref["id"].head(100))
    assert [f"{a:016x}{b:016x}" for a, b in arr.tolist()] == hexes  # sorted as (hi, lo) = as hex text


def test_cli_streams_from_the_shards_folder(shards, tmp_path):
    root, ref = shards
    r = subprocess.run([sys.executable, "scripts/prune.py", "--ratings", str(root), "--out", str(tmp_path / "k.csv"),
                        "--strategy", "topk", "--retention", "0.1", "--keep-column", str(tmp_path / "flags")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    k = round(0.1 * len(ref))
    assert pd.read_csv(tmp_path / "k.csv", dtype={"id": str})["id"].tolist() == ref["id"].head(k).tolist()
    assert f"kept {k} of {len(ref)} rows" in r.stdout
    assert pq.read_table(tmp_path / "flags/shard_00000.parquet").column("keep").to_numpy().sum() > 0
    bad = subprocess.run([sys.executable, "scripts/prune.py", "--ratings", str(tmp_path / "none"), "--out",
                          str(tmp_path / "k.npy"), "--strategy", "topk", "--retention", "0.1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: no ratings parquet files")


def test_cli_reference_sets_the_tail_in_memory_and_streamed(shards, tmp_path):
    """--reference: the trusted pairs' ratings file; the subset is prune_table's with those scores, on
    both paths, and a reference too small to estimate from is a one-line error."""
    root, ref = shards
    write_ratings(ref, tmp_path / "all.parquet")
    trusted = ref.nlargest(200, "score")  # trusted pairs all score high: most rows count as junk
    write_ratings(trusted.reset_index(drop=True), tmp_path / "val.csv")
    expect = prune_table(ref, "shift_gsample", 0.3, reference=trusted["score"].to_numpy())
    assert len(set(expect["id"]) - set(prune_table(ref, "shift_gsample", 0.3)["id"])) > 20  # the reference matters
    for src, out in ((tmp_path / "all.parquet", "k.csv"), (root, "k.parquet")):
        r = subprocess.run([sys.executable, "scripts/prune.py", "--ratings", str(src), "--out", str(tmp_path / out),
                            "--retention", "0.3", "--reference", str(tmp_path / "val.csv")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        got = pd.read_csv(tmp_path / out, dtype={"id": str}) if out.endswith(".csv") else pd.read_parquet(tmp_path / out)
        assert got["id"].tolist() == expect["id"].tolist()
    write_ratings(trusted.head(20).reset_index(drop=True), tmp_path / "few.csv")
    bad = subprocess.run([sys.executable, "scripts/prune.py", "--ratings", str(tmp_path / "all.parquet"), "--out",
                          str(tmp_path / "k2.csv"), "--retention", "0.3", "--reference", str(tmp_path / "few.csv")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "at least 50 scores" in bad.stderr and not (tmp_path / "k2.csv").exists()


def test_bad_scores_are_user_errors(tmp_path):
    pd.DataFrame({"id": ["a", "b"], "score": [1.0, np.nan]}).to_parquet(tmp_path / "r.parquet")
    with pytest.raises(UserError, match="NaN or infinite"):
        StreamRanker(ratings_files(tmp_path / "r.parquet"))
