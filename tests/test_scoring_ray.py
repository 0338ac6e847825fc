"""The Ray Data engine: the torch engine's scores bit for bit, resume after a kill, bad samples and parts reported."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import ray

from alchemist.data.pairs import SkipLog, load_pairs
from alchemist.ratings import rank_scores, read_ratings
from alchemist.scoring import score_table, shards_dir, skipped_path
from alchemist.scoring_ray import pool_size, rate_file_ray
from alchemist.selection import prune_table
from alchemist.utils.errors import UserError
from test_scoring import ROOT, setup  # noqa: F401  (the module fixture: 30 pairs, a tiny tokenizer, a saved rater)
from webdata import write_bytes_parquet, write_shards


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU Ray cluster for the module: pool_size gives one single-CPU actor."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(setup, tmp_path_factory):  # noqa: F811
    """The fixture's pairs (an unreadable PNG, an empty caption) as 3 webdataset shards and one byte parquet."""
    root = tmp_path_factory.mktemp("ray_inputs")
    table = pd.read_csv(setup["root"] / "data/pairs.csv", dtype=str, keep_default_na=False)
    table["image_path"] = [str(setup["root"] / "data" / p) for p in table["image_path"]]
    write_shards(table, root / "shards", shard_rows=11)
    write_bytes_parquet(table, root / "bytes.parquet", row_group_size=8)
    write_shards(table, root / "small", shard_rows=2)  # 15 parts, for the kill
    return root


def _ray(setup, spec, out, bs):  # noqa: F811
    rate_file_ray(setup["root"] / "run", spec, out, batch_size=bs, progress=False)
    return read_ratings(out)


def _torch(setup, spec, out, bs, shard_rows=64):  # noqa: F811
    skips = SkipLog()
    pairs = load_pairs(spec, setup["cfg"].data, skips)
    score_table(pairs, out, setup["rater"], setup["featurizer"], setup["cfg"], batch_size=bs, shard_rows=shard_rows,
                skipped=skips.items, progress=False)
    return read_ratings(out)


def _reasons(out):
    return pd.read_csv(skipped_path(out)).set_index("id")["reason"].sort_index()


def test_without_ray_the_engine_is_a_user_error(setup, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(UserError, match=r"--engine ray needs Ray Data: pip install 'ray\[data\]'"):
        rate_file_ray(setup["root"] / "run", setup["root"] / "data/pairs.csv", tmp_path / "r.parquet")


def test_pool_size_leaves_a_cpu_for_the_readers():
    assert pool_size({"CPU": 2.0}) == (1, {"num_cpus": 1})
    assert pool_size({"CPU": 1.0}) == (1, {"num_cpus": 1})
    assert pool_size({"CPU": 16.0}) == (15, {"num_cpus": 1})
    assert pool_size({"CPU": 33.0, "GPU": 4.0}) == (4, {"num_gpus": 1, "num_cpus": 8})


@pytest.mark.parametrize("fmt", ["tar", "bytes"])
def test_ray_and_torch_engines_give_identical_ratings(setup, inputs, cluster, tmp_path, fmt):  # noqa: F811
    """Each part gets the bits the torch engine gives its file scored alone (the same rows in the same
    batches of 4; the unreadable image inside the first batch): 3 tar shards, one byte parquet. (Cut
    differently, the heads' matmuls round differently: 4e-8 here, as between two --shard-rows.)"""
    files = sorted((inputs / "shards").glob("*.tar")) if fmt == "tar" else [inputs / "bytes.parquet"]
    spec = [str(f) for f in files]
    ref = pd.concat([_torch(setup, f, tmp_path / f"torch{k}.parquet", 4) for k, f in enumerate(files)])
    ref = rank_scores(ref.drop(columns=["rank", "official_score"]))
    got = _ray(setup, spec, tmp_path / "ray.parquet", 4)
    assert len(got) == 28 and got["id"].tolist() == ref["id"].tolist()
    np.testing.assert_array_equal(got["score"].to_numpy(), ref["score"].to_numpy())
    assert got["rank"].tolist() == list(range(28))
    assert got["extra"].tolist() == ref["extra"].tolist() and got["caption"].tolist() == ref["caption"].tolist()
    assert "official_score" not in got.columns
    torch_reasons = pd.concat([_reasons(tmp_path / f"torch{k}.parquet") for k in range(len(files))]).sort_index()
    assert _reasons(tmp_path / "ray.parquet").to_dict() == torch_reasons.to_dict()
    assert sorted(p.name for p in shards_dir(tmp_path / "ray.parquet").glob("*.parquet")) == \
        [f"part_{k:05d}.parquet" for k in range(len(files))]
    if fmt == "tar":  # scripts/prune.py streams the per-part files: the subset prune_table takes from the ratings
        argv = ["--ratings", str(shards_dir(tmp_path / "ray.parquet")), "--out", str(tmp_path / "kept.parquet"),
                "--retention", "0.5", "--keep-column", str(tmp_path / "flags")]
        r = subprocess.run([sys.executable, str(ROOT / "scripts/prune.py"), *argv], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        kept = pd.read_parquet(tmp_path / "kept.parquet")
        assert kept["id"].tolist() == prune_table(got, "shift_gsample", 0.5)["id"].tolist()
        flags = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "flags").glob("*.parquet"))])
        assert len(flags) == 30 and sorted(flags.loc[flags["keep"], "id"]) == sorted(kept["id"])


def test_a_killed_run_resumes_with_each_id_once_and_the_same_scores(setup, inputs, cluster, tmp_path):  # noqa: F811
    spec, out = str(inputs / "small/*.tar"), tmp_path / "killed.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, str(ROOT / "infer_rater.py"), "--engine", "ray", "--ckpt",
                             str(setup["root"] / "run"), "--csv", spec, "--out", str(out), "--bs", "1",
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    parts = shards_dir(out)
    deadline = time.time() + 600  # generous: on a loaded 2-core machine Ray's start alone took minutes
    while not list(parts.glob("part_*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the scoring run ended (exit {proc.returncode}) before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its process group; Ray then ends its actors
    proc.wait()
    time.sleep(2)  # a part in flight on the orphaned actor may still land: harmless, it is atomic
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts.glob("part_*.parquet")}
    assert 1 <= len(before) < 15 and not out.exists()

    resumed = _ray(setup, spec, out, 1)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts.glob("part_*.parquet")}
    assert len(after) == 15 and all(after[name] == before[name] for name in before)  # finished parts not redone
    # an uninterrupted run: each shard scored straight through (the torch engine, per file: the same bits)
    files = sorted((inputs / "small").glob("*.tar"))
    straight = rank_scores(pd.concat([_torch(setup, f, tmp_path / f"t{k}.parquet", 1) for k, f in enumerate(files)])
                           .drop(columns=["rank", "official_score"]))
    assert resumed["id"].is_unique and len(resumed) == 28
    assert resumed["id"].tolist() == straight["id"].tolist()
    np.testing.assert_array_equal(resumed["score"].to_numpy(), straight["score"].to_numpy())
    assert sorted(_reasons(out).index) == ["train_00003", "train_00005"]


def test_bad_samples_and_an_unreadable_shard_are_skipped_and_reported(setup, inputs, cluster, tmp_path):  # noqa: F811
    shards = sorted((inputs / "shards").glob("*.tar"))
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 40)
    blank = pd.DataFrame({"id": ["blank"], "image_path": [str(setup["root"] / "data/images/broken.png")],
                          "caption": [""], "extra": ["x"]})
    write_shards(blank, tmp_path / "blank", shard_rows=1)  # a shard with no usable row
    out = tmp_path / "ratings.csv"
    got = _ray(setup, [str(shards[0]), str(tmp_path / "broken.tar"), str(shards[2]), str(tmp_path / "blank/00000.tar")],
               out, 4)
    reasons = _reasons(out)
    assert reasons["train_00003"].startswith("unreadable image")
    assert reasons["train_00003"].endswith("(shard 00000.tar, member train_00003.png)")
    assert reasons["train_00005"] == "empty caption (shard 00000.tar, key train_00005)"
    assert reasons["broken.tar"].startswith("unreadable part: DataError: could not read webdataset shard")
    assert reasons["blank"] == "empty caption (shard 00000.tar, key blank)" and len(reasons) == 4
    # the other shards' rows are all there: 11 + 8, less the two bad ones
    ids = sorted(f"train_{i:05d}" for i in [*range(11), *range(22, 30)] if i not in (3, 5))
    assert sorted(got["id"]) == ids and got["score"].notna().all()
    assert (shards_dir(out) / "part_00001.failed.json").exists()


def test_a_model_the_actors_cannot_load_is_one_line(setup, inputs, cluster, tmp_path, capsys):  # noqa: F811
    import infer_rater

    argv = ["--engine", "ray", "--ckpt", str(setup["root"] / "run"), "--csv", str(inputs / "bytes.parquet"),
            "--out", str(tmp_path / "r.parquet"), "--no-progress", f"--text_enc_path={tmp_path / 'nope'}"]
    assert infer_rater.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: text encoder") and "is not a local Hugging Face model directory" in err[-1]
    assert not list(shards_dir(tmp_path / "r.parquet").glob("part_*"))
