"""The embedded demo dataset: deterministic, exact planted counts, defects that are what they claim."""
import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from alchemist.config import DataConfig
from alchemist.data.pairs import SkipLog, load_pairs
from experiments.demo_data import DemoSpec, format_summary, generate_demo

SPEC = DemoSpec(n_train=200, n_val=40, image_size=32, seed=0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = generate_demo(out, SPEC)
    defects = pd.read_csv(out / "defects.csv", dtype=str, keep_default_na=False)
    return out, summary, defects


def _digest(out, names=("train.csv", "val.csv", "defects.csv", "images/train_00000.png",
                        "images/train_00123.png", "images/val_00007.png")):
    return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}


def _pixels(out, id):
    return np.asarray(Image.open(out / "images" / f"{id}.png").convert("RGB"), dtype=np.float32) / 127.5 - 1


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    out, _, _ = demo
    again = generate_demo(tmp_path / "again", SPEC)
    assert not again.reused
    assert _digest(out) == _digest(tmp_path / "again")
    other = generate_demo(tmp_path / "other", DemoSpec(n_train=200, n_val=40, seed=1))
    assert all(a != b for a, b in zip(_digest(out).values(), _digest(other.out_dir).values()))


def test_reuses_same_spec_and_regenerates_other(demo, tmp_path):
    out = tmp_path / "d"
    generate_demo(out, DemoSpec(n_train=30, n_val=5))
    assert generate_demo(out, DemoSpec(n_train=30, n_val=5)).reused
    assert not generate_demo(out, DemoSpec(n_train=30, n_val=5), force=True).reused
    smaller = generate_demo(out, DemoSpec(n_train=20, n_val=5))
    assert not smaller.reused and sum(smaller.counts.values()) == 20
    assert len(list((out / "images").glob("*.png"))) == 25  # stale files of the larger run are gone


def test_planted_counts_exact_and_val_clean(demo):
    out, summary, defects = demo
    train = defects[defects["split"] == "train"]
    expected = {"clean": 110, "plain": 20, "noise": 20, "misaligned": 20, "duplicate": 10, "blurred": 20}
    assert train["kind"].value_counts().to_dict() == expected == summary.counts
    assert (defects[defects["split"] == "val"]["kind"] == "clean").all() and summary.n_val == 40
    assert "duplicate" in format_summary(summary) and "  10" in format_summary(summary)
    # round(rate * n) with odd sizes, and a rate that leaves nothing clean is refused
    assert DemoSpec(n_train=7, rate_plain=0.3).planted_counts()["plain"] == 2
    with pytest.raises(ValueError, match="need clean sources"):
        DemoSpec(n_train=20, rate_plain=0.45, rate_noise=0.5, rate_duplicate=0.05, rate_misaligned=0.0,
                 rate_blurred=0.0)
    with pytest.raises(ValueError, match="sum to <= 1"):
        DemoSpec(rate_plain=0.9, rate_noise=0.2)


def test_duplicates_copy_an_earlier_clean_pair(demo):
    out, _, defects = demo
    by_id = defects.set_index("id")
    train = pd.read_csv(out / "train.csv", dtype=str).set_index("id")
    for _, row in defects[defects["kind"] == "duplicate"].iterrows():
        src = row["source_id"]
        assert by_id.loc[src, "kind"] == "clean" and src < row["id"]
        assert (out / "images" / f"{row['id']}.png").read_bytes() == (out / "images" / f"{src}.png").read_bytes()
        assert train.loc[row["id"], "caption"] == train.loc[src, "caption"]


def test_misaligned_caption_is_another_scenes(demo):
    out, _, defects = demo
    by_id = defects.set_index("id")
    mis = defects[defects["kind"] == "misaligned"]
    for _, row in mis.iterrows():
        assert row["caption"] != row["true_caption"]
        assert row["caption"] == by_id.loc[row["source_id"], "caption"]
        src = by_id.loc[row["source_id"]]
        assert (row["shape"], row["colour"]) == (src["shape"], src["colour"])  # attributes = what the caption asks
        assert row["shape"] not in row["true_caption"] or row["colour"] not in row["true_caption"]


def test_plain_is_near_uniform_noise_is_not(demo):
    out, _, defects = demo
    std = {k: [_pixels(out, i).std(axis=(0, 1)).max() for i in defects[defects["kind"] == k]["id"]]
           for k in ("plain", "noise", "clean", "blurred")}
    assert max(std["plain"]) < 0.05
    assert min(std["noise"]) > 0.45
    assert 0.05 < np.median(std["clean"]) < 0.45
    assert np.median(std["blurred"]) < np.median(std["clean"])


def test_captions_name_their_attributes(demo):
    _, _, defects = demo
    scenes = defects[defects["kind"].isin(["clean", "blurred", "duplicate"])]
    words = {"1": "a", "2": "two", "3": "three"}
    for _, r in scenes.iterrows():
        cap = r["caption"]
        assert f"{words[r['count']]} {r['size']} {r['colour']} {r['shape']}" in cap
        assert f"{r['position']}" in cap and f"{r['background']} background" in cap
    noise = defects[defects["kind"] == "noise"]
    assert (noise["true_caption"] == "").all() and (noise["shape"] != "").all()


def test_pairs_reader_loads_demo_without_skips(demo):
    out, _, _ = demo
    for split, n in (("train", 200), ("val", 40)):
        skips = SkipLog()
        df = load_pairs(out / f"{split}.csv", DataConfig(image_size=32), skips)
        assert len(df) == n and skips.count == 0
