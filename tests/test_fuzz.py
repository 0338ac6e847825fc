"""A table with every kind of bad row and every odd image mode, as CSV and as parquet, through
training and scoring: each bad row listed once with a true reason (the same in both), each good row
trained on and scored, and the odd images decoded as an independent numpy reference says."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from alchemist import runtime, scoring
from alchemist.bilevel.launch import train_rater
from alchemist.config import RaterConfig, load_config
from alchemist.data.pairs import DataError, collate_pairs, load_pairs
from alchemist.models.vqvae import VQVAE
from alchemist.ratings import read_ratings
from alchemist.scoring import rate_file, skipped_path

ROOT = Path(__file__).resolve().parents[1]
SIDE = 16  # every image is SIDE x SIDE, the training size: crop and resize are identities
RNG = np.random.default_rng(13)


def _rgb():
    return RNG.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def _over_white(rgb, alpha):
    a = alpha[..., None].astype(np.float64) / 255
    return np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)


def _grey3(a):
    return np.repeat(a[..., None], 3, axis=2)


def _good_images(img: Path) -> dict[str, tuple[str, np.ndarray]]:
    """id -> (file name, the HxWx3 uint8 a viewer shows), each reference computed here with numpy."""
    out = {}
    grey = RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
    Image.fromarray(grey, "L").save(img / "grey.png")
    out["grey"] = ("grey.png", _grey3(grey))
    bits = RNG.integers(0, 2, (SIDE, SIDE)).astype(bool)
    Image.fromarray(bits).save(img / "bits.png")
    out["bits"] = ("bits.png", _grey3(bits.astype(np.uint8) * 255))
    palette, idx = RNG.integers(0, 256, (6, 3), dtype=np.uint8), RNG.integers(0, 6, (SIDE, SIDE), dtype=np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette(palette.reshape(-1).tolist())
    pal.save(img / "pal.png")
    out["pal"] = ("pal.png", palette[idx])
    pal.save(img / "pal_t.png", transparency=3)
    out["pal_t"] = ("pal_t.png", np.where((idx == 3)[..., None], np.uint8(255), palette[idx]))
    cmyk = RNG.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(img / "cmyk.tif")
    k = cmyk[..., 3:].astype(np.float64)
    out["cmyk"] = ("cmyk.tif", np.round((255 - cmyk[..., :3].astype(np.float64)) * (255 - k) / 255).astype(np.uint8))
    g16 = RNG.integers(0, 65536, (SIDE, SIDE), dtype=np.uint16)
    Image.fromarray(g16).save(img / "g16.png")
    out["g16"] = ("g16.png", _grey3(np.round(g16 / 257.0).astype(np.uint8)))
    rgb, alpha = _rgb(), RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(img / "rgba.png")
    out["rgba"] = ("rgba.png", _over_white(rgb, alpha))
    grey2 = RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
    Image.fromarray(np.dstack([grey2, alpha]), "LA").save(img / "la.png")
    out["la"] = ("la.png", _over_white(_grey3(grey2), alpha))
    keyed = _rgb()
    keyed[::3, ::2] = (10, 20, 30)
    Image.fromarray(keyed).save(img / "keyed.png", transparency=(10, 20, 30))  # a colour key: that colour is clear
    out["keyed"] = ("keyed.png", np.where((keyed == (10, 20, 30)).all(-1)[..., None], np.uint8(255), keyed))
    stored = _rgb()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    Image.fromarray(stored).save(img / "exif6.png", exif=exif)
    out["exif6"] = ("exif6.png", np.rot90(stored, k=-1))
    exif[0x0112] = 8
    Image.fromarray(_rgb()).save(img / "exif8.jpg", quality=95, exif=exif)
    with Image.open(img / "exif8.jpg") as raw:
        out["exif8"] = ("exif8.jpg", np.rot90(np.asarray(raw.convert("RGB")), k=1))
    for i in range(5):  # plain RGB, under ids and captions that read like missing values
        Image.fromarray(_rgb()).save(img / f"plain{i}.png")
    plain_ids = ["NA", "None", "null", "nan", "plain4"]
    for i, pid in enumerate(plain_ids):
        with Image.open(img / f"plain{i}.png") as im:
            out[pid] = (f"plain{i}.png", np.asarray(im.convert("RGB")))
    return out  # 16 good rows


def _bad_images(img: Path) -> None:
    Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img / "noise.png")
    Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img / "noise.jpg", quality=90)
    for name in ("noise.png", "noise.jpg"):
        data = (img / name).read_bytes()
        (img / f"cut_{name}").write_bytes(data[: len(data) // 2])
    (img / "text.png").write_text("not an image at all")
    (img / "empty.jpg").write_bytes(b"")
    (img / "folder.png").mkdir()


BAD = {  # id -> (image path, caption, what the reason must say)
    "missing": ("images/gone.png", "a", "missing file"),
    "nopath": ("", "b", "missing file"),
    "dir": ("images/folder.png", "c", "not a file"),
    "cut_png": ("images/cut_noise.png", "d", "unreadable image: "),
    "cut_jpg": ("images/cut_noise.jpg", "e", "unreadable image: OSError: image file is truncated"),
    "text": ("images/text.png", "f", "unreadable image: UnidentifiedImageError"),
    "empty_file": ("images/empty.jpg", "g", "unreadable image: UnidentifiedImageError"),
    "nocap": ("images/grey.png", "", "empty caption"),
    "spacecap": ("images/grey.png", "   ", "empty caption"),
}


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    img = root / "images"
    img.mkdir()
    good = _good_images(img)
    _bad_images(img)
    captions = {"None": "None", "null": "NA", "nan": "null"}  # text, not missing values
    rows = [(i, f"images/{name}", captions.get(i, f"a picture called {i}")) for i, (name, _) in good.items()]
    rows += [(i, path, cap) for i, (path, cap, _) in BAD.items()]
    order = RNG.permutation(len(rows))
    table = pd.DataFrame([rows[j] for j in order], columns=["id", "image_path", "caption"])
    table.to_csv(root / "pairs.csv", index=False)
    table.to_parquet(root / "pairs.parquet", index=False)
    for i in range(8):
        Image.fromarray(_rgb()).save(img / f"val{i}.png")
    pd.DataFrame({"id": [f"val{i}" for i in range(8)], "image_path": [f"images/val{i}.png" for i in range(8)],
                  "caption": [f"held-out picture {i}" for i in range(8)]}).to_csv(root / "val.csv", index=False)
    torch.manual_seed(0)
    kw = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
    torch.save({"state_dict": VQVAE(**kw).state_dict(), "config": kw}, root / "tok.pt")
    return {"root": root, "good": good}


def _cfg(root, table, run):
    over = {"train_csv_path": root / table, "val_csv_path": root / "val.csv", "image_size": SIDE, "num_workers": 0,
            "patch_size": 4, "patch_nums": "1,2,4", "vocab_size": 32, "Cvae": 8, "vae_ch": 32, "vae_ch_mult": "1,2,2",
            "ckpt_path": root, "vae_ckpt": "tok.pt", "text_enc_path": "", "text_max_len": 16, "depth": 1,
            "raterDepth": 1, "bs": 4, "ep": 2, "fp16": 0, "caption_dropout": 0.0, "local_out_dir_path": root / "runs",
            "exp_name": run, "save_every": 100, "log_every": 1, "progress": False}
    return load_config(RaterConfig, ROOT / "configs/config_rater.json", {k: str(v) for k, v in over.items()})


def _spy(monkeypatch, module, seen: dict):
    """Record every image a batch carried, by id, where ``module`` collates pairs."""
    def collate(items):
        batch = collate_pairs(items)
        for i, x in zip(batch["ids"], batch["img_B3HW"]):
            seen.setdefault(i, []).append(x.clone())
        return batch

    monkeypatch.setattr(module, "collate_pairs", collate)


def _check_pixels(seen: dict, good: dict) -> None:
    for i, (_, ref_HW3) in good.items():
        want = torch.from_numpy(np.array(ref_HW3)).permute(2, 0, 1).float() / 127.5 - 1
        for got in seen[i]:
            assert torch.allclose(got, want, atol=1e-6), i


def _skips(path: Path) -> dict[str, str]:
    rows = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert rows["id"].is_unique, rows  # each bad row once
    return dict(zip(rows["id"], rows["reason"]))


@pytest.mark.parametrize("table", ["pairs.csv", "pairs.parquet"])
def test_fuzz_table_through_training_and_scoring(fuzz, monkeypatch, table):
    root, good = fuzz["root"], fuzz["good"]
    cfg = _cfg(root, table, f"run_{Path(table).suffix[1:]}")
    seen_train: dict = {}
    _spy(monkeypatch, runtime, seen_train)
    summary = train_rater(cfg)
    assert summary["steps"] == 4 and summary["skipped_rows"] == len(BAD)  # 4 steps of 4: the 16 good rows once

    trained = _skips(cfg.output.run_dir / "skipped.csv")
    assert trained.keys() == BAD.keys()
    for i, (_, _, reason) in BAD.items():
        assert trained[i].startswith(reason), (i, trained[i])
    train_ids = {i for i in seen_train if not i.startswith("val")}
    assert train_ids == good.keys() and all(len(seen_train[i]) == 1 for i in train_ids)  # every good row, once
    _check_pixels(seen_train, good)

    seen_scored: dict = {}
    _spy(monkeypatch, scoring, seen_scored)
    out = root / f"ratings_{Path(table).suffix[1:]}.parquet"
    rate_file(cfg.output.run_dir, root / table, out, progress=False)
    ratings = read_ratings(out)
    assert sorted(ratings["id"]) == sorted(good) and ratings["score"].notna().all()
    assert _skips(skipped_path(out)) == trained  # the same rows with the same reasons
    _check_pixels(seen_scored, good)

    # without the pre-pass the unreadable images are found when decoded: the same rows, the same kind of reason
    late = root / f"late_{Path(table).suffix[1:]}.parquet"
    rate_file(cfg.output.run_dir, root / table, late, ["--check_images=false"], progress=False)
    late_skips = _skips(skipped_path(late))
    assert late_skips.keys() == trained.keys() and sorted(read_ratings(late)["id"]) == sorted(good)
    assert {i: r.split(" (")[0] for i, r in late_skips.items()} == {i: r.split(" (")[0] for i, r in trained.items()}


def test_a_repeated_id_refuses_the_table_naming_it(fuzz):
    root = fuzz["root"]
    table = pd.read_csv(root / "pairs.csv", dtype=str, keep_default_na=False)
    table.loc[len(table)] = ["rgba", "images/grey.png", "a second rgba"]
    table.to_csv(root / "dup.csv", index=False)
    with pytest.raises(DataError, match="id 'rgba' appears 2 times"):
        load_pairs(root / "dup.csv", _cfg(root, "dup.csv", "dup").data)
