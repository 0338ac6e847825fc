"""Scoring: batch-independent scores, 1 vs 2 processes, resume after a crash, skipped rows reported."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import infer_rater
from alchemist import scoring
from alchemist.build import build_rater, build_text_encoder, build_tokenizer
from alchemist.config import ConfigError, RaterConfig, config_to_dict, load_config
from alchemist.data.cache import build_cache
from alchemist.data.pairs import DataError, SkipLog, load_pairs
from alchemist.data.tokens import Featurizer
from alchemist.models.vqvae import VQVAE
from alchemist.ratings import read_ratings
from alchemist.scoring import load_rater, score_table, scoring_config, shards_dir, skipped_path
from experiments.demo_data import DemoSpec, generate_demo

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Demo pairs (one unreadable image, one empty caption), a tiny tokenizer and a saved random rater."""
    root = tmp_path_factory.mktemp("scoring")
    generate_demo(root / "data", DemoSpec(n_train=30, n_val=2, image_size=16, seed=0))
    table = pd.read_csv(root / "data/train.csv", dtype=str)
    (root / "data/images/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    table.loc[3, "image_path"] = "images/broken.png"
    table.loc[5, "caption"] = ""
    table["extra"] = [f"x{i}" for i in range(len(table))]
    table.to_csv(root / "data/pairs.csv", index=False)

    torch.manual_seed(0)
    kw = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
    torch.save({"state_dict": VQVAE(**kw).state_dict(), "config": kw}, root / "tok.pt")
    over = {"image_size": 16, "num_workers": 0, "patch_size": 4, "patch_nums": "1,2,4", "vocab_size": 32, "Cvae": 8,
            "vae_ch": 32, "vae_ch_mult": "1,2,2", "ckpt_path": str(root), "vae_ckpt": "tok.pt", "text_enc_path": "",
            "text_max_len": 16, "depth": 1, "raterDepth": 1, "fp16": 0, "train_csv_path": "/elsewhere/train.csv",
            "check_images": False}  # no pre-pass: the unreadable image is found, and reported, by the scoring pass
    cfg = load_config(RaterConfig, ROOT / "configs/config_rater.json", over)
    text = build_text_encoder(cfg.model, CPU)
    rater = build_rater(cfg.model, text.width, CPU)
    ckpt = root / "run/checkpoints/step_00000007.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"rater": rater.state_dict(), "config": config_to_dict(cfg), "step": 7}, ckpt)
    rater, cfg = load_rater(root / "run", CPU)
    cfg = scoring_config(cfg)
    skips = SkipLog()
    pairs = load_pairs(root / "data/pairs.csv", cfg.data, skips)
    featurizer = Featurizer(build_tokenizer(cfg.model, CPU), text, CPU)
    return dict(root=root, cfg=cfg, rater=rater, featurizer=featurizer, pairs=pairs, load_skips=skips.items)


def _score(s, out, table=None, **kw):
    kw = {"batch_size": 7, "shard_rows": 8, "progress": False, "skipped": s["load_skips"], **kw}
    table = s["pairs"] if table is None else table
    return read_ratings(score_table(table, out, s["rater"], s["featurizer"], s["cfg"], **kw))


def _by_id(df, col="score"):
    return df.set_index("id")[col].sort_index()


# ----------------------------------------------------------------------------- loading
def test_load_rater_from_run_dir_or_file_and_clear_errors(setup, tmp_path):
    a, cfg = load_rater(setup["root"] / "run", CPU)
    b, _ = load_rater(setup["root"] / "run/checkpoints/step_00000007.pt", CPU)
    assert not a.training and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert cfg.model.raterDepth == 1 and cfg.data.train_csv_path == "/elsewhere/train.csv"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rater(tmp_path / "nope.pt", CPU)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_rater(tmp_path, CPU)
    (tmp_path / "junk.pt").write_text("hello")
    with pytest.raises(ValueError, match="not a readable rater checkpoint"):
        load_rater(tmp_path / "junk.pt", CPU)


def test_scoring_config_clears_training_data_and_guards_model_keys(setup):
    cfg = scoring_config(setup["cfg"], ["--caption_col=true_caption", "--text_enc_path=/moved/minilm"])
    assert cfg.data.caption_col == "true_caption" and cfg.model.text_enc_path == "/moved/minilm"
    assert cfg.data.train_csv_path == "" and cfg.data.caption_dropout == 0.0
    with pytest.raises(ConfigError, match="fixed by the checkpoint"):
        scoring_config(setup["cfg"], ["--raterDepth=2"])


# ----------------------------------------------------------------------------- scores
def test_score_is_independent_of_batch_size_and_order(setup, tmp_path):
    one = _score(setup, tmp_path / "bs1.parquet", batch_size=1)
    seven = _score(setup, tmp_path / "bs7.parquet", batch_size=7)
    shuffled_table = setup["pairs"].sample(frac=1.0, random_state=0).reset_index(drop=True)
    shuffled = _score(setup, tmp_path / "shuffled.parquet", table=shuffled_table)
    assert len(one) == len(setup["pairs"]) - 1 and one["score"].std() > 1e-3
    for other in (seven, shuffled):
        np.testing.assert_allclose(_by_id(other).to_numpy(), _by_id(one).to_numpy(), atol=1e-6, rtol=0)
    # the official score depends on the fixed 256-row batches (not on --bs), but it moves with the order
    np.testing.assert_allclose(_by_id(seven, "official_score"), _by_id(one, "official_score"), atol=1e-6, rtol=0)
    assert not np.allclose(_by_id(shuffled, "official_score"), _by_id(one, "official_score"), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fp16,tol", [(0, 1e-5), (2, 0.01), (1, 0.01)])
def test_score_batch_independence_in_each_precision(setup, tmp_path, device, fp16, tol):
    """Scoring runs the trunk in the config's precision (bf16 on a GPU by default; --fp16=0 for fp32) and
    the heads in fp32. In fp32 a pair's score does not move with the batch; in bf16/fp16 it moves by the
    trunk's rounding: at most 1 % of the scores' spread here (CPU: 0.3 % bf16, 0.02 % fp16; the GPU
    figure comes from scripts/device_check.sh, which runs this test there)."""
    cfg = scoring_config(setup["cfg"], [f"--fp16={fp16}"])
    f = setup["featurizer"]
    rater = copy.deepcopy(setup["rater"]).to(device)
    featurizer = Featurizer(copy.deepcopy(f.vqvae).to(device), copy.deepcopy(f.text_encoder).to(device), device)
    s = {**setup, "cfg": cfg, "rater": rater, "featurizer": featurizer}
    one = _by_id(_score(s, tmp_path / "bs1.parquet", batch_size=1))
    seven = _by_id(_score(s, tmp_path / "bs7.parquet", batch_size=7))
    fp32 = _by_id(_score({**s, "cfg": scoring_config(setup["cfg"], ["--fp16=0"])}, tmp_path / "fp32.parquet"))
    spread = one.std()
    assert np.abs(seven.to_numpy() - one.to_numpy()).max() <= tol * spread
    if fp16:  # the low-precision trunk really ran
        assert np.abs(one.to_numpy() - fp32.to_numpy()).max() > 1e-6


def test_ratings_are_ranked_keep_input_columns_and_report_skips(setup, tmp_path):
    out = tmp_path / "ratings.csv"
    r = _score(setup, out)
    assert list(r.columns) == ["id", "image_path", "caption", "extra", "score", "official_score", "rank"]
    assert r["rank"].tolist() == list(range(len(r))) and r["score"].is_monotonic_decreasing
    pairs = setup["pairs"].set_index("id")
    assert (r.set_index("id")["extra"] == pairs.loc[r["id"], "extra"]).all()
    skipped = pd.read_csv(skipped_path(out))
    reasons = dict(zip(skipped["id"], skipped["reason"]))
    assert reasons.keys() == {"train_00003", "train_00005"} and not set(reasons) & set(r["id"])
    assert reasons["train_00003"].startswith("unreadable image") and reasons["train_00005"] == "empty caption"
    shards = sorted(p.name for p in shards_dir(out).iterdir())
    assert shards == ["meta.json"] + [f"shard_0000{k}.parquet" for k in range(4)]


def test_feature_cache_gives_the_same_scores(setup, tmp_path):
    f = setup["featurizer"]
    build_cache(setup["pairs"], tmp_path / "cache", f.vqvae, f.text_encoder, 16, shard_size=10, batch_size=7,
                dtype="float32", progress=False)
    raw = _score(setup, tmp_path / "raw.parquet")
    cached = _score(setup, tmp_path / "cached.parquet", cache_dir=tmp_path / "cache")
    assert raw["id"].tolist() == cached["id"].tolist()
    np.testing.assert_allclose(cached["score"], raw["score"], atol=1e-5, rtol=0)
    assert pd.read_csv(skipped_path(tmp_path / "cached.parquet"))["id"].tolist() == ["train_00005", "train_00003"]


def test_resume_after_crash_loses_only_the_shard_in_flight(setup, tmp_path, monkeypatch):
    real, written = scoring.write_shard, []

    def crash_after_first(path, shard):
        if written:
            raise KeyboardInterrupt("simulated kill")
        written.append(path.name)
        real(path, shard)

    monkeypatch.setattr(scoring, "write_shard", crash_after_first)
    out = tmp_path / "ratings.parquet"
    with pytest.raises(KeyboardInterrupt):
        _score(setup, out)
    assert written == ["shard_00000.parquet"] and not out.exists()

    def spy(path, shard):
        written.append(path.name)
        real(path, shard)

    monkeypatch.setattr(scoring, "write_shard", spy)
    resumed = _score(setup, out)
    assert written[1:] == ["shard_00001.parquet", "shard_00002.parquet", "shard_00003.parquet"]
    straight = _score(setup, tmp_path / "straight.parquet")
    assert resumed["id"].is_unique and sorted(resumed["id"]) == sorted(straight["id"])
    np.testing.assert_allclose(_by_id(resumed), _by_id(straight), atol=1e-6, rtol=0)

    with pytest.raises(DataError, match="another table"):  # shards of another table are never reused
        _score(setup, out, table=setup["pairs"].iloc[:-1])


# ----------------------------------------------------------------------------- CLI, one and two processes
def test_cli_one_and_two_processes_write_identical_ratings(setup, tmp_path, capsys, free_port):
    args = ["--ckpt", str(setup["root"] / "run"), "--csv", str(setup["root"] / "data/pairs.csv"),
            "--bs", "5", "--shard-rows", "8", "--num-workers", "0", "--no-progress"]
    assert infer_rater.main(args + ["--out", str(tmp_path / "one.csv")]) == 0
    out = capsys.readouterr().out
    assert "rated 28 pairs" in out and "skipped 2 (1 empty caption, 1 unreadable image)" in out

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port}", str(ROOT / "infer_rater.py"), *args,
                           "--out", str(tmp_path / "two.csv")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rated 28 pairs") == 1  # only rank 0 merges
    one, two = read_ratings(tmp_path / "one.csv"), read_ratings(tmp_path / "two.csv")
    assert one["id"].tolist() == two["id"].tolist() and one["rank"].tolist() == two["rank"].tolist()
    np.testing.assert_allclose(two["score"], one["score"], atol=1e-6, rtol=0)
    assert pd.read_csv(skipped_path(tmp_path / "two.csv")).equals(pd.read_csv(skipped_path(tmp_path / "one.csv")))


def test_cli_user_errors_are_one_line_exit_2(setup, tmp_path, capsys):
    base = ["--csv", str(setup["root"] / "data/pairs.csv"), "--no-progress"]
    cases = [(["--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "r.csv")], "does not exist"),
             (["--ckpt", str(setup["root"] / "run"), "--out", str(tmp_path / "r.txt")], "unknown table format"),
             (["--ckpt", str(setup["root"] / "run"), "--out", str(tmp_path / "r.csv"), "--depth=3"], "fixed by")]
    for argv, msg in cases:
        assert infer_rater.main(base + argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err


def test_a_rerun_removes_the_temp_files_of_killed_writes(setup, tmp_path):
    out = tmp_path / "ratings.parquet"
    shards = shards_dir(out)
    shards.mkdir()
    stale = [shards / ".shard_00001.parquet.k3j9x0q_.tmp", tmp_path / ".ratings.parquet.0123abcd.tmp",
             tmp_path / ".ratings.skipped.csv.zzzzzzzz.tmp"]
    other = tmp_path / ".notes.txt.0123abcd.tmp"  # not this job's: left alone
    for p in stale + [other]:
        p.write_bytes(b"half")
    _score(setup, out)
    assert not any(p.exists() for p in stale) and other.exists()
    assert not list(shards.glob("*.tmp"))


def test_shards_and_parquet_bytes_give_the_same_scores_and_tokens(setup, tmp_path):
    """The pairs as webdataset shards and as parquet with embedded bytes: the same ratings, the same
    skipped rows, and a feature cache with the same token ids."""
    from webdata import write_bytes_parquet, write_shards

    table = pd.read_csv(setup["root"] / "data/pairs.csv", dtype=str, keep_default_na=False)
    table["image_path"] = [str(setup["root"] / "data" / p) for p in table["image_path"]]
    write_shards(table, tmp_path / "shards", shard_rows=11)
    write_bytes_parquet(table, tmp_path / "bytes.parquet", row_group_size=8)
    ref = _score(setup, tmp_path / "csv.parquet")
    f = setup["featurizer"]
    build_cache(setup["pairs"], tmp_path / "cache_csv", f.vqvae, f.text_encoder, 16, shard_size=40, batch_size=7,
                dtype="float32", progress=False)
    for name, spec in (("tar", str(tmp_path / "shards/*.tar")), ("bytes", tmp_path / "bytes.parquet")):
        skips = SkipLog()
        pairs = load_pairs(spec, setup["cfg"].data, skips)
        assert pairs["id"].tolist() == setup["pairs"]["id"].tolist()
        out = tmp_path / f"{name}.parquet"
        r = _score(setup, out, table=pairs, skipped=skips.items)
        assert r["id"].tolist() == ref["id"].tolist() and r["rank"].tolist() == ref["rank"].tolist()
        np.testing.assert_array_equal(r["score"].to_numpy(), ref["score"].to_numpy())
        np.testing.assert_array_equal(r["extra"].to_numpy(), ref["extra"].to_numpy())
        reasons = pd.read_csv(skipped_path(out)).set_index("id")["reason"]
        assert sorted(reasons.index) == ["train_00003", "train_00005"]
        where = "(shard 00000.tar, member train_00003.png)" if name == "tar" else "(file bytes.parquet, row 3)"
        assert reasons["train_00003"].startswith("unreadable image") and reasons["train_00003"].endswith(where)
        assert "BytesIO" not in reasons["train_00003"]
        build_cache(pairs, tmp_path / f"cache_{name}", f.vqvae, f.text_encoder, 16, shard_size=40, batch_size=7,
                    dtype="float32", progress=False)
        for part in ("idx", "ok"):
            np.testing.assert_array_equal(np.load(tmp_path / f"cache_{name}/shard_00000.{part}.npy"),
                                          np.load(tmp_path / f"cache_csv/shard_00000.{part}.npy"))
