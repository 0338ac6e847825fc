"""Text-image pairs: read the table, decode images, batch them.

The paper's data format (docs/method.md §7) is a CSV with an image path, a caption and an id; other
columns ride along so a pruned subset can be written back with the input's columns. A bad row
(empty caption, missing file, unreadable image) is skipped, never fatal and never silent: it is
recorded with its reason in a :class:`SkipLog`, which callers write out as ``skipped.csv``.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from PIL import Image, ImageOps

from alchemist.config import DataConfig
from alchemist.data import members, sources
from alchemist.data.sources import DataError  # noqa: F401  (defined with the readers; imported from here too)
from alchemist.utils.io import atomic_open

log = logging.getLogger(__name__)

CANONICAL_COLUMNS = ("id", "image_path", "caption")
IMAGE_COLUMN_CANDIDATES = ("image_save_path", "image_path")  # used in this order when image_col == ""
SKIP_EMPTY_CAPTION = "empty caption"
SKIP_MISSING_FILE = "missing file"
SKIP_NOT_A_FILE = "not a file"  # a directory or another non-regular path
SKIP_UNREADABLE = "unreadable image"
SKIP_NO_IMAGE = "no image"  # a webdataset sample without an image member, a null bytes cell


# ----------------------------------------------------------------------------- images
# Transparent pixels are composited over this colour: white, as a viewer shows them on a blank page
# (dropping the alpha channel would instead show whatever colour the encoder left under it).
BACKGROUND = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how some readers give 16-bit grey


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB, so that every mode reads as it looks.

    16-bit grey is scaled to 8 bits (PIL's own conversion clips it, which turns almost every
    pixel white); alpha (RGBA, LA, PA, a palette or colour key with transparency) is composited
    over ``BACKGROUND``; grey, 1-bit, palette and CMYK go through PIL's conversion (CMYK as
    ``(255 - c) * (255 - k) / 255``).
    """
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.int64)
        alpha = rgba[..., 3:]
        bg = np.asarray(BACKGROUND, dtype=np.int64)
        # round(rgb * a / 255 + bg * (1 - a / 255)) in integers (a tie is impossible: 255 is odd)
        out = (rgba[..., :3] * alpha + bg * (255 - alpha) + 127) // 255
        return Image.fromarray(out.astype(np.uint8), "RGB")
    return img.convert("RGB")


def preprocess_image(img: Image.Image, size: int) -> torch.Tensor:
    """RGB (``to_rgb``), centre crop to a square, LANCZOS resize to ``size``, float 3HW in [-1, 1].

    Crop first, then resize: ``resize(box=...)`` would be cheaper but lets the LANCZOS kernel
    read pixels outside the box, leaking the cropped-away border into the edges.
    """
    img = to_rgb(img)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    img_HW3 = torch.from_numpy(np.array(img, dtype=np.uint8))
    return img_HW3.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image(path: str, size: int) -> torch.Tensor:
    """Decode one file upright (its EXIF orientation applied) and preprocess it; raises whatever
    PIL raises for a broken file.

    PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default (False) so that a truncated
    file fails in ``load()`` instead of silently coming back with grey rows.
    """
    with Image.open(members.open_image_file(path)) as img:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return preprocess_image(img, size)


def unreadable(e: BaseException) -> str:
    """The skip reason for an image PIL could not open or decode: the error's type and first line."""
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    msg = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", msg)  # bytes from a shard: no address
    return f"{SKIP_UNREADABLE}: {type(e).__name__}" + (f": {msg}" if msg else "")


def reason_kind(reason: str) -> str:
    """A skip reason without its detail (the error text, where the sample is): for counts."""
    return reason.split(":")[0].split(" (")[0]


def path_problem(path: str) -> str:
    """"missing file" (no path, nothing there, a broken link), "not a file" (a directory, a device)
    or "" for a regular file (for a member locator: of its container)."""
    if path and members.is_member(path):
        path = members.container(path)
    if not (path and os.path.exists(path)):
        return SKIP_MISSING_FILE
    return "" if os.path.isfile(path) else SKIP_NOT_A_FILE


def image_problem(path: str) -> str:
    """Why the image at ``path`` cannot be used ("" when it can): the pre-pass of ``load_pairs``.

    It fails where ``load_image`` would, with the same reason: the image is decoded (a JPEG at
    1/8 scale, which reads the same compressed data, in about half the time) and its EXIF block
    parsed. PIL's ``verify`` alone would be cheaper but passes truncated JPEGs.
    """
    problem = path_problem(path)
    if problem:
        return problem
    try:
        with Image.open(members.open_image_file(path)) as img:
            img.draft("RGB", (1, 1))  # JPEG only: decode at the smallest DCT scale (same entropy data)
            img.load()
            img.getexif()
    except members.NoImage:
        return SKIP_NO_IMAGE
    except Exception as e:  # a corrupt file can raise nearly anything (OSError, SyntaxError, zlib.error, ...)
        return unreadable(e)
    return ""


def check_images(paths: Sequence[str], workers: int = 0, chunk: int = 256) -> list[str]:
    """``image_problem`` of every path, in order, on ``workers`` threads (decoding releases the GIL)."""
    if workers <= 1 or len(paths) <= chunk:
        return [image_problem(p) for p in paths]
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return [r for part in pool.map(lambda ps: [image_problem(p) for p in ps], chunks) for r in part]


# ----------------------------------------------------------------------------- skip log
class SkipLog:
    """Rows left out because of bad input, as (id, reason); written as ``skipped.csv``.

    A row met again (a training stream cycles over its table) is recorded once."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self._seen: set[tuple[str, str]] = set()

    def add(self, id: str, reason: str) -> None:
        item = (str(id), str(reason))
        if item not in self._seen:
            self._seen.add(item)
            self.items.append(item)

    def extend(self, items: Iterable[tuple[str, str]]) -> None:
        for id, reason in items:
            self.add(id, reason)

    @property
    def count(self) -> int:
        return len(self.items)

    def read(self, path: str | os.PathLike) -> SkipLog:
        """Add the rows of an earlier ``skipped.csv`` (a resumed run keeps what it had listed)."""
        with open(path, newline="") as f:
            self.extend((row["id"], row["reason"]) for row in csv.DictReader(f))
        return self

    def write(self, path: str | os.PathLike) -> Path:
        """CSV with columns ``id,reason`` (header only when nothing was skipped), atomically."""
        with atomic_open(path) as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["id", "reason"])
            w.writerows(self.items)
        return Path(path)


# ----------------------------------------------------------------------------- table
def _read_table(path: Path, text_cols: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"data table {str(path)!r} does not exist; check data.train_csv_path / data.val_csv_path")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            # the key columns stay text: ids like "00012" must not become 12
            # and "NA", "None", "null" in them are text, not missing values (a caption can read "NA")
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype={c: str for c in text_cols},
                               keep_default_na=False, na_values={c: [""] for c in text_cols})
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DataError(f"could not read data table {str(path)!r} ({type(e).__name__}: {e}); "
                        "check that it is a valid CSV or parquet file") from None
    raise DataError(f"data table {str(path)!r} has an unknown extension {suffix!r}; use .csv, .tsv or .parquet")


def _is_empty(values: pd.Series) -> np.ndarray:
    """True where a text cell is NaN/None or only whitespace."""
    return (values.isna() | values.astype(str).str.strip().eq("")).to_numpy()


def _pick_image_col(df: pd.DataFrame, cfg: DataConfig, path: Path) -> str:
    wanted = [cfg.image_col] if cfg.image_col else list(IMAGE_COLUMN_CANDIDATES)
    for c in wanted:
        if c in df.columns:
            return c
    raise DataError(f"data table {str(path)!r} has no image column {' or '.join(map(repr, wanted))} "
                    f"(columns present: {', '.join(map(str, df.columns))}); set data.image_col")


def _ids(df: pd.DataFrame, cfg: DataConfig, path: Path) -> pd.Series:
    """The id column as text, or generated ``row00000042`` ids (0-based row of the input file).

    Generated ids are stable across runs for the same file; they change if rows are reordered.
    """
    if cfg.id_col not in df.columns:
        log.warning("data table %s has no id column %r; using generated row ids (row00000000, ...)", path, cfg.id_col)
        return pd.Series([f"row{i:08d}" for i in range(len(df))], index=df.index, dtype=str)
    raw = df[cfg.id_col]
    empty = _is_empty(raw)
    if empty.any():
        raise DataError(f"id column {cfg.id_col!r} of {str(path)!r} is empty in {int(empty.sum())} row(s) "
                        f"(first: row {int(np.flatnonzero(empty)[0])}); fill the ids or drop the column to "
                        "use generated row ids")
    ids = raw.astype(str).str.strip()
    dup = ids[ids.duplicated()]
    if len(dup):
        first = dup.iloc[0]
        raise DataError(f"id {first!r} appears {int((ids == first).sum())} times in {str(path)!r} "
                        f"({dup.nunique()} duplicated id(s) in all); ids must be unique: fix column "
                        f"{cfg.id_col!r} or drop it to use generated row ids")
    return ids


def _captions(df: pd.DataFrame, cfg: DataConfig, path: Path) -> pd.Series:
    """The caption column, with the recaption column taking over where it is non-empty."""
    has_cap = cfg.caption_col in df.columns
    has_recap = bool(cfg.recaption_col) and cfg.recaption_col in df.columns
    if not (has_cap or has_recap):
        names = " or ".join(repr(c) for c in (cfg.caption_col, cfg.recaption_col) if c)
        raise DataError(f"data table {str(path)!r} has no caption column {names} "
                        f"(columns present: {', '.join(map(str, df.columns))}); set data.caption_col")
    caps = df[cfg.caption_col] if has_cap else pd.Series(np.nan, index=df.index, dtype=object)
    if has_recap:
        recap = df[cfg.recaption_col]
        caps = caps.where(_is_empty(recap), recap)
    return caps


def load_pairs(path: sources.Spec, cfg: DataConfig, skip_log: SkipLog | None = None,
               allow_empty: bool = False) -> pd.DataFrame:
    """Read pairs into the canonical table used everywhere else.

    ``path`` is a CSV/parquet table of image paths, or webdataset tar shards (a ``.tar``, a glob,
    a ``{000..009}`` range or a list), or parquet file(s) with an image-bytes column (``sources.py``).
    Output columns: ``id`` (str), ``image_path`` (absolute str, or a member locator for an image
    inside a shard or parquet file: ``members.py``), ``caption`` (str), then every other input column
    unchanged and in input order. An input column that has a canonical name is replaced by the
    canonical value (e.g. a relative ``image_path`` becomes absolute, ``caption`` becomes the
    re-caption where one is used). Relative image paths resolve against the table's folder. Rows with
    an empty caption, a missing image file or a path that is not a file (a directory) are dropped and
    recorded in ``skip_log`` (and counted in a log line either way); so, with ``cfg.check_images``
    (the default), is every image that fails ``image_problem``'s pre-pass, so that the bad rows are
    known, and listed, before any training step. Without it, an unreadable image is found when
    :class:`PairsDataset` decodes it and skipped at batch time. Reasons of samples from shards or
    byte tables end with where the sample is: ``(shard 00001.tar, key 000000042)``. ``allow_empty``: a
    table with no usable row is returned empty instead of failing (one shard of many, read alone).
    """
    kind, files = sources.resolve(path, cfg)
    if kind == "table":
        path = files[0]
        df = _read_table(path, [c for c in (cfg.id_col, cfg.image_col, *IMAGE_COLUMN_CANDIDATES,
                                            cfg.caption_col, cfg.recaption_col) if c])
        image_col = _pick_image_col(df, cfg, path)
        where = None
    else:
        df = sources.read_shards(files, cfg) if kind == "shards" else sources.read_bytes_tables(files, cfg)
        where = df.pop(sources.WHERE_COLUMN).to_numpy(dtype=object)
        image_col = sources.LOCATOR_COLUMN
        path = str(files[0]) + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")
    captions = _captions(df, cfg, path)
    ids = _ids(df, cfg, path)

    rel = df[image_col]
    no_path = _is_empty(rel)
    if where is None:
        base = Path(path).resolve().parent
        image_paths = [("" if missing else os.path.normpath(base / str(p))) for p, missing in zip(rel, no_path)]
    else:
        image_paths = [("" if missing else str(p)) for p, missing in zip(rel, no_path)]
    empty_caption = _is_empty(captions)
    reasons = np.array([SKIP_EMPTY_CAPTION if no_caption else
                        SKIP_NO_IMAGE if (where is not None and not p) else path_problem(p)
                        for p, no_caption in zip(image_paths, empty_caption)], dtype=object)
    if cfg.check_images:
        todo = np.flatnonzero(reasons == "")
        t0 = time.perf_counter()
        reasons[todo] = check_images([image_paths[i] for i in todo], cfg.num_workers)
        log.info("%s: checked %d images in %.1fs", path, len(todo), time.perf_counter() - t0)
    bad = reasons != ""
    if where is not None:
        reasons[bad] = [f"{r} ({w})" for r, w in zip(reasons[bad], where[bad])]
    skipped = list(zip(ids[bad], reasons[bad]))
    if skip_log is not None:
        skip_log.extend(skipped)
    counts = collections.Counter(reason_kind(r) for _, r in skipped)
    detail = ", ".join(f"{n} {r}" for r, n in counts.most_common())
    if skipped:
        log.warning("%s: skipped %d of %d rows (%s)", path, len(skipped), len(df), detail)
    if bad.all() and not allow_empty:
        raise DataError(f"data {str(path)!r} has no usable rows ({len(df)} rows"
                        + (f": {detail}" if detail else "") + "); check the caption column and that "
                        "image paths are correct relative to the table's folder")

    keep = ~bad
    out = pd.DataFrame({
        "id": ids[keep].to_numpy(dtype=object),
        "image_path": np.asarray(image_paths, dtype=object)[keep],
        "caption": captions[keep].astype(str).to_numpy(dtype=object),
    }).astype(str)
    rest = df.loc[keep, [c for c in df.columns if c not in CANONICAL_COLUMNS]].reset_index(drop=True)
    return pd.concat([out, rest], axis=1)


# ----------------------------------------------------------------------------- dataset
def drops_caption(seed: int, epoch: int, index: int, p: float) -> bool:
    """Caption dropout (for classifier-free guidance) as a pure function of (seed, epoch, index),
    shared by the image dataset and the feature cache so both train on the same captions."""
    if p == 0.0:
        return False
    return bool(np.random.default_rng([seed, epoch, index]).random() < p)


class PairsDataset(torch.utils.data.Dataset):
    """Decoded, preprocessed pairs; a broken image yields an item with ``error`` set.

    Ids, paths and captions are held in Arrow string arrays rather than Python lists: forked
    DataLoader workers then read shared buffers instead of touching (and so copying) millions of
    refcounted objects. The epoch lives in a shared-memory tensor so that ``set_epoch`` reaches
    workers that were started earlier (``persistent_workers=True``) as well as new ones.
    """

    def __init__(self, table: pd.DataFrame, image_size: int, caption_dropout: float = 0.0, seed: int = 0):
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.ids = pa.array(table["id"].astype(str).tolist(), type=pa.large_string())
        self.paths = pa.array(table["image_path"].astype(str).tolist(), type=pa.large_string())
        self.captions = pa.array(table["caption"].astype(str).tolist(), type=pa.large_string())
        self.image_size = int(image_size)
        self.caption_dropout = float(caption_dropout)
        self.seed = int(seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        drop = drops_caption(self.seed, int(self._epoch[0]), i, self.caption_dropout)
        caption = "" if drop else self.captions[i].as_py()
        item = {"index": i, "id": self.ids[i].as_py(), "img_3HW": None, "caption": caption, "error": None,
                "image_size": self.image_size}
        path = self.paths[i].as_py()
        try:
            item["img_3HW"] = load_image(path, self.image_size)
        except Exception as e:  # a corrupt file can raise nearly anything (OSError, SyntaxError, zlib.error, ...)
            item["error"] = ((SKIP_NO_IMAGE if isinstance(e, members.NoImage) else unreadable(e))
                             + (f" ({members.describe(path)})" if members.is_member(path) else ""))
        return item


def collate_pairs(items: list[dict]) -> dict:
    """Stack the good items; report the failed ones in ``skipped`` instead of raising.

    ``index_B``, ``ids``, ``img_B3HW`` and ``captions`` are aligned and hold only the good items.
    """
    ok = [it for it in items if it["error"] is None]
    if ok:
        img_B3HW = torch.stack([it["img_3HW"] for it in ok])
    else:
        size = items[0]["image_size"] if items else 0
        img_B3HW = torch.zeros(0, 3, size, size)
    return {
        "index_B": torch.tensor([it["index"] for it in ok], dtype=torch.long),
        "ids": [it["id"] for it in ok],
        "img_B3HW": img_B3HW,
        "captions": [it["caption"] for it in ok],
        "skipped": [(it["id"], it["error"]) for it in items if it["error"] is not None],
    }
