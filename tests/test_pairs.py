"""Reading text-image tables: skips with reasons, clear errors, preprocessing, sharding, dropout."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from alchemist.config import DataConfig
from alchemist.data.pairs import (BACKGROUND, DataError, PairsDataset, SkipLog, collate_pairs, drops_caption,
                                  check_images, load_image, load_pairs, preprocess_image, to_rgb)

CFG = DataConfig(image_size=16, caption_dropout=0.0, num_workers=0)
NO_CHECK = DataConfig(image_size=16, caption_dropout=0.0, num_workers=0, check_images=False)


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
    df = load_pairs(table_dir / "pairs.csv", NO_CHECK, skips)
    assert list(df.columns) == ["id", "image_path", "caption", "score"]
    assert df["id"].tolist() == ["a", "b", "c"]  # without the pre-pass the truncated one is found at decode time
    assert df["image_path"].tolist() == [str((table_dir / "imgs" / n).resolve()) for n in ("a.png", "b.png", "c.jpg")]
    assert df["score"].tolist() == [1.5, 2.5, 3.5]
    assert skips.items == [("d", "missing file"), ("e", "empty caption")]
    assert skips.count == 2

    out = skips.write(tmp_path / "out" / "skipped.csv")
    assert out.read_text() == "id,reason\nd,missing file\ne,empty caption\n"


def test_the_pre_pass_lists_unreadable_images_when_the_table_is_read(table_dir):
    """data.check_images (the default): the truncated JPEG is skipped before any batch, with the
    reason decoding it gives."""
    skips = SkipLog()
    assert load_pairs(table_dir / "pairs.csv", CFG, skips)["id"].tolist() == ["a", "b"]
    assert [i for i, _ in skips.items] == ["c", "d", "e"]
    reason = dict(skips.items)["c"]
    assert reason.startswith("unreadable image: OSError: image file is truncated")
    decoded = PairsDataset(load_pairs(table_dir / "pairs.csv", NO_CHECK), 16)[2]["error"]
    assert decoded.split(" (")[0] == reason.split(" (")[0]  # the byte count may differ


def test_image_check_catches_each_bad_kind_in_order_on_threads(tmp_path):
    _save(tmp_path / "ok.png")
    _truncated_jpeg(tmp_path / "cut.jpg")
    Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    png = (tmp_path / "noise.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "flip.png").write_bytes(png[:20] + bytes([png[20] ^ 0xFF]) + png[21:])  # IHDR CRC no longer matches
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "dir.png").mkdir()
    names = ["ok.png", "cut.jpg", "cut.png", "flip.png", "text.png", "empty.png", "dir.png", "gone.png"]
    paths = [str(tmp_path / n) for n in names]
    got = check_images(paths)
    assert got[0] == "" and got[6:] == ["not a file", "missing file"]
    assert all(r.startswith("unreadable image: ") for r in got[1:6]), got
    for p, r in zip(paths[1:6], got[1:6]):  # each really fails to decode
        with pytest.raises(Exception):
            load_image(p, 8)
    assert check_images(paths * 40, workers=3, chunk=7) == got * 40


def test_csv_text_that_reads_like_a_missing_value_is_kept(table_dir, tmp_path):
    """An id or caption "NA", "None" or "null" is text, not a missing value (an empty caption still is)."""
    src = pd.read_csv(table_dir / "pairs.csv", keep_default_na=False)
    src = src.assign(id=["NA", "None", "c", "d", "e"], caption=["NA", "null", "broken", "missing", ""])
    src.to_csv(table_dir / "na.csv", index=False)
    skips = SkipLog()
    df = load_pairs(table_dir / "na.csv", NO_CHECK, skips)
    assert df["id"].tolist() == ["NA", "None", "c"] and df["caption"].tolist() == ["NA", "null", "broken"]
    assert skips.items == [("d", "missing file"), ("e", "empty caption")]


def test_dataset_reports_truncated_image_instead_of_raising(table_dir):
    ds = PairsDataset(load_pairs(table_dir / "pairs.csv", NO_CHECK), image_size=16)
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
    assert load_pairs(table_dir / "noid.csv", NO_CHECK)["id"].tolist() == ["row00000000", "row00000001", "row00000002"]


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


# ----------------------------------------------------------------------------- odd image modes vs numpy references
def _decoded(path, side):
    """load_image at the image's own (square) side, back to HxWx3 uint8: crop and resize are then identities."""
    x_3HW = load_image(str(path), side)
    return ((x_3HW + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)


def _grey3(a_HW):
    return np.repeat(a_HW[..., None], 3, axis=2)


def _over_white(rgb_HW3, alpha_HW):
    """Reference alpha compositing over the documented white background, in float64."""
    a = alpha_HW[..., None].astype(np.float64) / 255
    return np.round(rgb_HW3.astype(np.float64) * a + 255 * (1 - a)).astype(np.uint8)


RNG = np.random.default_rng(7)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    a16 = RNG.integers(0, 65536, (12, 12), dtype=np.uint16)
    a16[0, :3] = (0, 65535, 32768)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    ref = _grey3(np.round(a16 / 257.0).astype(np.uint8))  # 65535 -> 255
    got = _decoded(tmp_path / "g16.png", 12)
    np.testing.assert_array_equal(got, ref)
    assert got.mean() < 200  # PIL's own conversion clipped nearly every pixel to 255
    assert tuple(got[0, :3, 0]) == (0, 255, 128)
    # a 32-bit "I" image holding 16-bit values (how some readers give 16-bit grey)
    as_i = to_rgb(Image.fromarray(a16.astype(np.int32), "I"))
    np.testing.assert_array_equal(np.asarray(as_i), ref)


@pytest.mark.parametrize("orientation,undo", [(2, lambda a: a[:, ::-1]), (3, lambda a: a[::-1, ::-1]),
                                              (6, lambda a: np.rot90(a, k=-1)), (8, lambda a: np.rot90(a, k=1))])
def test_exif_orientation_is_applied(tmp_path, orientation, undo):
    """A 12 wide x 8 high image stored sideways; the decode must show it upright (then centre-cropped)."""
    stored = RNG.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
    upright = undo(stored)
    h, w = upright.shape[:2]
    side = min(h, w)
    ref = upright[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    np.testing.assert_array_equal(_decoded(tmp_path / "o.png", side), ref)


def test_exif_orientation_of_a_jpeg(tmp_path):
    stored = RNG.integers(0, 256, (8, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "o.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "o.jpg") as raw:  # the stored pixels as the JPEG decoder gives them
        raw_HW3 = np.asarray(raw.convert("RGB"))
    upright = np.rot90(raw_HW3, k=-1)  # 8 wide x 16 high
    np.testing.assert_array_equal(_decoded(tmp_path / "o.jpg", 8), upright[4:12])


def test_alpha_is_composited_over_white(tmp_path):
    rgb = RNG.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (10, 10), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    got = _decoded(tmp_path / "rgba.png", 10)
    np.testing.assert_array_equal(got, _over_white(rgb, alpha))
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[0, 1]) == tuple(rgb[0, 1])
    assert BACKGROUND == (255, 255, 255)

    grey = RNG.integers(0, 256, (10, 10), dtype=np.uint8)
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(_decoded(tmp_path / "la.png", 10), _over_white(_grey3(grey), alpha))


def test_palette_with_and_without_transparency(tmp_path):
    palette = RNG.integers(0, 256, (4, 3), dtype=np.uint8)
    idx = RNG.integers(0, 4, (10, 10), dtype=np.uint8)
    idx[0, 0] = 2
    img = Image.fromarray(idx, "P")
    img.putpalette(palette.reshape(-1).tolist())
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(_decoded(tmp_path / "p.png", 10), palette[idx])
    img.save(tmp_path / "pt.png", transparency=2)  # palette entry 2 is fully transparent
    ref = np.where((idx == 2)[..., None], np.uint8(255), palette[idx])
    got = _decoded(tmp_path / "pt.png", 10)
    np.testing.assert_array_equal(got, ref)
    assert tuple(got[0, 0]) == (255, 255, 255)


def test_grey_one_bit_and_cmyk(tmp_path):
    grey = RNG.integers(0, 256, (10, 10), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(_decoded(tmp_path / "l.png", 10), _grey3(grey))
    bits = RNG.integers(0, 2, (10, 10)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    np.testing.assert_array_equal(_decoded(tmp_path / "b.png", 10), _grey3(bits.astype(np.uint8) * 255))
    cmyk = RNG.integers(0, 256, (10, 10, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    k = cmyk[..., 3:].astype(np.float64)
    ref = np.round((255 - cmyk[..., :3].astype(np.float64)) * (255 - k) / 255).astype(np.uint8)
    np.testing.assert_array_equal(_decoded(tmp_path / "c.tif", 10), ref)


def test_a_directory_is_not_a_file_and_a_missing_path_is_missing(tmp_path):
    _save(tmp_path / "ok.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    pd.DataFrame({"id": ["ok", "dir", "gone", "link", "nopath"],
                  "image_path": ["ok.png", "folder.png", "gone.png", "dangling.png", ""],
                  "caption": ["c"] * 5}).to_csv(tmp_path / "t.csv", index=False)
    skips = SkipLog()
    assert load_pairs(tmp_path / "t.csv", CFG, skips)["id"].tolist() == ["ok"]
    assert skips.items == [("dir", "not a file"), ("gone", "missing file"), ("link", "missing file"),
                           ("nopath", "missing file")]
