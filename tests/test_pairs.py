"""Reading text-image tables: skips with reasons, clear errors, preprocessing, sharding, dropout."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from alchemist.config import DataConfig
from alchemist.data.pairs import (DataError, drops_caption, PairsDataset, SkipLog, collate_pairs, load_pairs,
                                  preprocess_image)

CFG = DataConfig(image_size=16, caption_dropout=0.0, num_workers=0)


def _save(path, colour=(200, 30, 30), size=(20, 20), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _truncated_jpeg(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def table_dir(tmp_path):
    """A CSV with relative paths: 2 good rows, a missing file, a truncated image, an empty caption."""
    img = tmp_path / "imgs"
    _save(img / "a.png", (255, 0, 0))
    _save(img / "b.png", (0, 255, 0))
    _truncated_jpeg(img / "c.jpg")
    _save(img / "e.png")
    pd.DataFrame({
        "id": ["a", "b", "c", "d", "e"],
        "image_path": ["imgs/a.png", "imgs/b.png", "imgs/c.jpg", "imgs/nope.png", "imgs/e.png"],
        "caption": ["red", "green", "broken", "missing", ""],
        "score": [1.5, 2.5, 3.5, 4.5, 5.5],
    }).to_csv(tmp_path / "pairs.csv", index=False)
    return tmp_path


def test_load_pairs_keeps_good_rows_and_records_skips(table_dir, tmp_path):
    skips = SkipLog()
    df = load_pairs(table_dir / "pairs.csv", CFG, skips)
    assert list(df.columns) == ["id", "image_path", "caption", "score"]
    assert df["id"].tolist() == ["a", "b", "c"]  # the truncated one is only found at decode time
    assert df["image_path"].tolist() == [str((table_dir / "imgs" / n).resolve()) for n in ("a.png", "b.png", "c.jpg")]
    assert df["score"].tolist() == [1.5, 2.5, 3.5]
    assert skips.items == [("d", "missing file"), ("e", "empty caption")]
    assert skips.count == 2

    out = skips.write(tmp_path / "out" / "skipped.csv")
    assert out.read_text() == "id,reason\nd,missing file\ne,empty caption\n"


def test_csv_text_that_reads_like_a_missing_value_is_kept(table_dir, tmp_path):
    """An id or caption "NA", "None" or "null" is text, not a missing value (an empty caption still is)."""
    src = pd.read_csv(table_dir / "pairs.csv", keep_default_na=False)
    src = src.assign(id=["NA", "None", "c", "d", "e"], caption=["NA", "null", "broken", "missing", ""])
    src.to_csv(table_dir / "na.csv", index=False)
    skips = SkipLog()
    df = load_pairs(table_dir / "na.csv", CFG, skips)
    assert df["id"].tolist() == ["NA", "None", "c"] and df["caption"].tolist() == ["NA", "null", "broken"]
    assert skips.items == [("d", "missing file"), ("e", "empty caption")]


def test_dataset_reports_truncated_image_instead_of_raising(table_dir):
    ds = PairsDataset(load_pairs(table_dir / "pairs.csv", CFG), image_size=16)
    bad = ds[2]
    assert bad["img_3HW"] is None and bad["error"].startswith("unreadable image: ")
    assert "truncated" in bad["error"]
    batch = collate_pairs([ds[0], ds[1], ds[2]])
    assert batch["img_B3HW"].shape == (2, 3, 16, 16)
    assert batch["index_B"].tolist() == [0, 1] and batch["ids"] == ["a", "b"] and batch["captions"] == ["red", "green"]
    assert batch["skipped"] == [("c", bad["error"])]
    assert torch.allclose(batch["img_B3HW"][0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # red in [-1, 1]
    empty = collate_pairs([bad])
    assert empty["img_B3HW"].shape == (0, 3, 16, 16) and empty["index_B"].numel() == 0


def test_missing_column_and_no_usable_rows_are_clear_errors(tmp_path):
    pd.DataFrame({"id": ["x"], "image_path": ["x.png"], "text": ["hi"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"no caption column 'caption'.*columns present: id, image_path, text"):
        load_pairs(tmp_path / "t.csv", CFG)
    pd.DataFrame({"id": ["x"], "path": ["x.png"], "caption": ["hi"]}).to_csv(tmp_path / "u.csv", index=False)
    with pytest.raises(DataError, match="no image column 'image_save_path' or 'image_path'"):
        load_pairs(tmp_path / "u.csv", CFG)
    none_ok = pd.DataFrame({"id": ["x", "y"], "image_path": ["x.png", "y.png"], "caption": ["hi", ""]})
    none_ok.to_csv(tmp_path / "v.csv", index=False)
    skips = SkipLog()
    with pytest.raises(DataError, match=r"no usable rows \(2 rows: 1 missing file, 1 empty caption\)"):
        load_pairs(tmp_path / "v.csv", CFG, skips)
    assert skips.count == 2
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "nope.csv", CFG)


def test_duplicate_ids_are_rejected_and_missing_ids_generated(table_dir, tmp_path):
    df = pd.read_csv(table_dir / "pairs.csv")
    df.loc[1, "id"] = "a"
    df.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError, match="id 'a' appears 2 times"):
        load_pairs(tmp_path / "dup.csv", CFG)
    df.drop(columns=["id"]).to_csv(table_dir / "noid.csv", index=False)
    assert load_pairs(table_dir / "noid.csv", CFG)["id"].tolist() == ["row00000000", "row00000001", "row00000002"]


def test_parquet_gives_the_same_table_as_csv(table_dir):
    pd.read_csv(table_dir / "pairs.csv").to_parquet(table_dir / "pairs.parquet")
    from_csv = load_pairs(table_dir / "pairs.csv", CFG)
    pd.testing.assert_frame_equal(load_pairs(table_dir / "pairs.parquet", CFG), from_csv)


def test_numeric_looking_ids_stay_text(tmp_path):
    _save(tmp_path / "x.png")
    table = pd.DataFrame({"id": ["007"], "image_save_path": ["x.png"], "caption": ["c"]})
    table.to_csv(tmp_path / "t.csv", index=False)
    df = load_pairs(tmp_path / "t.csv", CFG)
    assert df["id"].tolist() == ["007"] and df["image_save_path"].tolist() == ["x.png"]
    assert df["image_path"].tolist() == [str(tmp_path / "x.png")]


def test_recaption_column_preferred_where_present(tmp_path):
    for n in "abc":
        _save(tmp_path / f"{n}.png")
    pd.DataFrame({"id": list("abc"), "image_path": ["a.png", "b.png", "c.png"],
                  "caption": ["orig a", "orig b", "orig c"],
                  "cogvlm_caption": ["new a", "", None]}).to_csv(tmp_path / "t.csv", index=False)
    cfg = DataConfig(recaption_col="cogvlm_caption")
    df = load_pairs(tmp_path / "t.csv", cfg)
    assert df["caption"].tolist() == ["new a", "orig b", "orig c"]
    assert "cogvlm_caption" in df.columns
    absent = DataConfig(recaption_col="llava_caption")  # set but not in the table: plain captions
    assert load_pairs(tmp_path / "t.csv", absent)["caption"].tolist() == ["orig a", "orig b", "orig c"]


def test_preprocess_centre_crops_and_maps_to_unit_range():
    wide = Image.new("RGB", (90, 30))
    for x0, colour in ((0, (255, 0, 0)), (30, (0, 0, 255)), (60, (0, 255, 0))):
        wide.paste(colour, (x0, 0, x0 + 30, 30))
    img_3HW = preprocess_image(wide, 8)
    assert img_3HW.shape == (3, 8, 8) and img_3HW.dtype == torch.float32
    assert torch.allclose(img_3HW, torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 8, 8), atol=1e-6)
    tall = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 24), dtype=np.uint8), "L")
    x_3HW = preprocess_image(tall, 12)
    assert x_3HW.shape == (3, 12, 12) and x_3HW.min() >= -1 and x_3HW.max() <= 1 and x_3HW.min() < -0.5


def _many(tmp_path, n):
    _save(tmp_path / "one.png", size=(8, 8))
    pd.DataFrame({"id": [f"s{i}" for i in range(n)], "image_path": ["one.png"] * n,
                  "caption": [f"cap {i}" for i in range(n)]}).to_csv(tmp_path / "many.csv", index=False)
    return load_pairs(tmp_path / "many.csv", CFG)


def test_caption_dropout_is_deterministic_and_near_rate(tmp_path):
    table = _many(tmp_path, 2000)

    def dropped(ds, epoch):
        ds.set_epoch(epoch)
        return np.array([drops_caption(ds.seed, epoch, i, ds.caption_dropout) for i in range(len(ds))])

    a, b = PairsDataset(table, 8, 0.2, seed=1), PairsDataset(table, 8, 0.2, seed=1)
    e0 = dropped(a, 0)
    assert (e0 == dropped(b, 0)).all()
    assert abs(e0.mean() - 0.2) < 0.03
    assert (e0 != dropped(a, 1)).any() and (e0 != dropped(PairsDataset(table, 8, 0.2, seed=2), 0)).any()
    assert (dropped(a, 0) == e0).all()  # going back to an epoch gives its draws back
    dropped_i = int(np.flatnonzero(e0)[0])
    a.set_epoch(0)
    assert a[dropped_i]["caption"] == "" and a[int(np.flatnonzero(~e0)[0])]["caption"].startswith("cap ")
    none = PairsDataset(table, 8, 0.0)
    assert [none[i]["caption"] for i in range(20)] == table["caption"].tolist()[:20]


def test_workers_and_distributed_sharding(tmp_path):
    table = _many(tmp_path, 24)
    ds = PairsDataset(table, 8, caption_dropout=0.5, seed=3)
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(ds, batch_size=5, sampler=sampler, num_workers=2, collate_fn=collate_pairs)
        ids = [i for batch in loader for i in batch["ids"]]
        assert len(ids) == 12
        seen += ids
    assert sorted(seen) == sorted(table["id"]) and len(set(seen)) == 24

    # set_epoch reaches persistent workers; captions match the single-process dataset
    loader = DataLoader(ds, batch_size=8, num_workers=1, persistent_workers=True, collate_fn=collate_pairs)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got = [c for batch in loader for c in batch["captions"]]
        assert got == [ds[i]["caption"] for i in range(len(ds))]
    assert 0 < sum(c == "" for c in got) < 24
