"""Webdataset shards and parquet with image bytes read as the same pairs as a CSV of paths."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from alchemist.config import DataConfig
from alchemist.data.members import read_bytes
from alchemist.data.pairs import (DataError, PairsDataset, SkipLog, load_pairs, preprocess_image,
                                  reason_kind)
from alchemist.data.sources import expand, resolve
from webdata import write_bytes_parquet, write_shards

CFG = DataConfig(image_size=16, caption_dropout=0.0, num_workers=0)


@pytest.fixture
def pairs(tmp_path):
    """7 rows: JPEGs with an EXIF rotation and odd sizes, a PNG with alpha, a truncated JPEG, an empty
    caption, a missing file; as a CSV of paths, 3 webdataset shards and a parquet with bytes."""
    rng = np.random.default_rng(0)
    img = tmp_path / "imgs"
    img.mkdir()
    paths = []
    for i in range(7):
        p = img / f"{i}.{'png' if i == 1 else 'jpg'}"
        arr = rng.integers(0, 256, (20 + i, 30, 3 + (i == 1)), dtype=np.uint8)
        im = Image.fromarray(arr)
        if i == 0:
            exif = Image.Exif()
            exif[0x0112] = 6  # rotated: decoding must turn it upright
            im.save(p, exif=exif)
        else:
            im.save(p)
        paths.append(p)
    paths[3].write_bytes(paths[3].read_bytes()[:200])  # truncated
    paths[5].unlink()  # missing
    table = pd.DataFrame({"id": [f"{i:03d}" for i in range(7)], "image_path": [str(p) for p in paths],
                          "caption": [f"caption {i}" for i in range(7)], "extra": [f"x{i}" for i in range(7)]})
    table.loc[4, "caption"] = ""
    table.to_csv(tmp_path / "pairs.csv", index=False)
    write_shards(table, tmp_path / "shards", shard_rows=3)
    write_bytes_parquet(table, tmp_path / "bytes.parquet", row_group_size=2)
    return tmp_path


def _load(spec, cfg=CFG):
    skips = SkipLog()
    return load_pairs(spec, cfg, skips), skips.items


@pytest.mark.parametrize("check", [True, False])
def test_three_formats_give_the_same_rows_pixels_and_skips(pairs, check):
    cfg = DataConfig(image_size=16, caption_dropout=0.0, num_workers=0, check_images=check)
    ref, ref_skips = _load(pairs / "pairs.csv", cfg)
    for spec in (str(pairs / "shards/*.tar"), pairs / "bytes.parquet"):
        df, skips = _load(spec, cfg)
        if not check and spec.suffix == ".parquet" if hasattr(spec, "suffix") else False:
            # without the pre-pass a null bytes cell is found when decoded, and skipped then
            null = PairsDataset(df, 16)[int(np.flatnonzero(df["id"] == "005")[0])]
            assert null["error"] == "no image (file bytes.parquet, row 5)"
            df = df[df["id"] != "005"].reset_index(drop=True)
            skips = sorted(skips + [("005", null["error"])])
        assert df["id"].tolist() == ref["id"].tolist()
        assert df["caption"].tolist() == ref["caption"].tolist() and df["extra"].tolist() == ref["extra"].tolist()
        # same rows skipped for the same reasons, each saying where the sample is
        same = {"missing file": "no image"}  # a sample without an image member / a null bytes cell
        assert [(i, reason_kind(r)) for i, r in skips] == [(i, same.get(reason_kind(r), reason_kind(r)))
                                                           for i, r in ref_skips]
        assert all(" (" in r for _, r in skips), skips
        wheres = [r.rsplit(" (", 1)[1] for _, r in skips]
        assert all(("shard 0000" in w if "shards" in str(spec) else "file bytes.parquet" in w) for w in wheres)
        a, b = PairsDataset(ref, 16), PairsDataset(df, 16)
        for i in range(len(ref)):
            x, y = a[i], b[i]
            assert (x["error"] is None) == (y["error"] is None)
            if x["error"] is None:
                assert torch.equal(x["img_3HW"], y["img_3HW"])  # identical decoded pixels
            else:
                assert same.get(reason_kind(x["error"]), reason_kind(x["error"])) == reason_kind(y["error"])
    assert [i for i, _ in ref_skips] == (["003", "004", "005"] if check else ["004", "005"])
    # the EXIF rotation is applied to bytes from a shard as to the file: upright, not as stored
    shard_item = PairsDataset(_load(str(pairs / "shards/*.tar"), cfg)[0], 16)[0]
    with Image.open(pairs / "imgs/0.jpg") as im:
        im.load()
        stored = preprocess_image(im, 16)
        assert torch.equal(shard_item["img_3HW"], preprocess_image(ImageOps.exif_transpose(im), 16))
    assert not torch.equal(shard_item["img_3HW"], stored)


def test_shard_specs_globs_ranges_lists_and_ids(pairs):
    one = [pairs / f"shards/{k:05d}.tar" for k in range(3)]
    assert expand(str(pairs / "shards/{00000..00002}.tar")) == one == expand(str(pairs / "shards/*.tar"))
    assert expand([str(one[0]), str(pairs / "shards/0000[12].tar")]) == one
    assert resolve(one, CFG) == ("shards", one)
    assert resolve(pairs / "bytes.parquet", CFG)[0] == "bytes" and resolve(pairs / "pairs.csv", CFG)[0] == "table"
    a, _ = _load([str(p) for p in one[:2]])
    assert a["id"].tolist() == ["000", "001", "002"]  # shard 0 and 1: 3 with the bad ones gone
    # a json uid becomes the id (the key rides along); the caption may live in the json
    write_shards(pd.read_csv(pairs / "pairs.csv", dtype=str), pairs / "uid", 4, caption_in="json", uid=True)
    b, skips = _load(str(pairs / "uid/*.tar"))
    assert b["id"].tolist() == ["u000", "u001", "u002", "u006"] and b["key"].tolist() == ["000", "001", "002", "006"]
    assert b["caption"].tolist() == ["caption 0", "caption 1", "caption 2", "caption 6"]
    assert skips[2] == ("u005", "no image (shard 00001.tar, key 005)")


def test_bytes_are_read_lazily_by_member(pairs):
    df, _ = _load(pairs / "bytes.parquet")
    assert read_bytes(df["image_path"].iloc[-1]) == (pairs / "imgs/6.jpg").read_bytes()
    tar, _ = _load(str(pairs / "shards/*.tar"))
    assert read_bytes(tar["image_path"].iloc[-1]) == (pairs / "imgs/6.jpg").read_bytes()


def test_bad_inputs_are_one_sentence(pairs, tmp_path):
    with pytest.raises(DataError, match="no file matches"):
        load_pairs(str(tmp_path / "none/*.tar"), CFG)
    with pytest.raises(DataError, match="mix webdataset shards"):
        load_pairs([str(pairs / "shards/00000.tar"), str(pairs / "pairs.csv")], CFG)
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(DataError, match="could not read webdataset shard"):
        load_pairs(tmp_path / "bad.tar", CFG)
    with pytest.raises(DataError, match="no column 'pixels'"):
        load_pairs(pairs / "bytes.parquet", DataConfig(image_bytes_col="pixels"))


def test_gzipped_shards_read_as_plain_ones(pairs):
    import gzip

    (pairs / "gz").mkdir()
    for p in sorted((pairs / "shards").glob("*.tar")):
        (pairs / "gz" / (p.stem + ".tar.gz")).write_bytes(gzip.compress(p.read_bytes()))
    plain, plain_skips = _load(str(pairs / "shards/*.tar"))
    gz, gz_skips = _load(str(pairs / "gz/*.tar.gz"))
    assert gz["id"].tolist() == plain["id"].tolist() and gz["caption"].tolist() == plain["caption"].tolist()
    assert [r.replace(".tar.gz", ".tar") for _, r in gz_skips] == [r for _, r in plain_skips]
    a, b = PairsDataset(plain, 16), PairsDataset(gz, 16)
    assert all(torch.equal(a[i]["img_3HW"], b[i]["img_3HW"]) for i in range(len(plain)))


def test_img2dataset_metadata_parquet_is_joined_by_key(pairs):
    """img2dataset writes 00000.parquet beside 00000.tar (key, url, status, uid, ...; failed downloads too)."""
    for k, p in enumerate(sorted((pairs / "shards").glob("*.tar"))):
        keys = [f"{i:03d}" for i in range(3 * k, 3 * k + 3)] + [f"9{k}"]  # a failed download: not in the tar
        pd.DataFrame({"key": keys, "uid": [f"{int(x):032x}" for x in keys], "url": [f"http://x/{x}" for x in keys],
                      "status": ["success"] * 3 + ["failed_to_download"]}).to_parquet(p.with_suffix(".parquet"))
    cfg = DataConfig(image_size=16, caption_dropout=0.0, num_workers=0, shard_meta_cols="uid,url")
    df, skips = _load(str(pairs / "shards/*.tar"), cfg)
    assert df["id"].tolist() == [f"{i:032x}" for i in (0, 1, 2, 6)]  # the joined uid is the id
    assert df["url"].tolist() == [f"http://x/00{i}" for i in (0, 1, 2, 6)] and "status" not in df
    assert df["extra"].tolist() == ["x0", "x1", "x2", "x6"]  # the json's fields stay
    every, _ = _load(str(pairs / "shards/*.tar"), DataConfig(image_size=16, num_workers=0, shard_meta_cols="*"))
    assert every["status"].tolist() == ["success"] * 4
    with pytest.raises(DataError, match=r"no column\(s\) \['sha256'\]"):
        load_pairs(str(pairs / "shards/*.tar"), DataConfig(shard_meta_cols="uid,sha256"))
    (pairs / "shards/00001.parquet").unlink()
    with pytest.raises(DataError, match="no metadata parquet"):
        load_pairs(str(pairs / "shards/*.tar"), cfg)
