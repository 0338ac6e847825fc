"""Where pairs come from: a table of image paths, webdataset tar shards, or parquet with image bytes.

The last two are what img2dataset writes, the formats image-text data is curated in at scale.
``resolve`` tells them apart from the input spec (``data.train_csv_path`` and friends); the readers
here turn shards and byte tables into the same raw table a CSV gives (id, image, caption, other
columns), with member locators (``members.py``) in place of file paths, so that ``load_pairs`` applies
the one set of checks, skips and preprocessing to all three. No image is read here: shards are
listed from their tar headers (only the small ``.txt`` / ``.json`` members are read) and byte
columns are left on disk.

Ids: the table's ``data.id_col`` when it has one, else the sample's ``uid`` (a json field or a
column), else its webdataset ``key``.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Sequence, Union

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from alchemist.config import DataConfig
from alchemist.data.members import parquet_locator, tar_locator
from alchemist.utils.errors import UserError

Spec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")  # first present is the sample's image
BYTES_COLUMN_CANDIDATES = ("jpg", "image", "bytes", "png", "webp", "img")  # when data.image_bytes_col == ""
ID_FALLBACKS = ("uid", "key")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LOCATOR_COLUMN = "image_path"  # the column the readers put locators in
WHERE_COLUMN = "_where"  # "shard x.tar, key k" for skip reasons; dropped by load_pairs


class DataError(UserError):
    """A user-fixable problem with the data; the message names the thing and the fix."""


# ----------------------------------------------------------------------------- resolving a spec
def expand(spec: Spec) -> list[Path]:
    """Files named by a path, a glob (``shards/*.tar``), a brace range (``{00000..00009}.tar``) or a
    list of those, in order (each glob sorted)."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand(s)]
    text = os.fspath(spec)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", text)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [p for i in range(lo, hi + 1) for p in expand(text[:m.start()] + f"{i:0{width}d}" + text[m.end():])]
    if glob.has_magic(text):
        found = sorted(glob.glob(text))
        if not found:
            raise DataError(f"no file matches {text!r}; check data.train_csv_path / data.val_csv_path")
        return [Path(p) for p in found]
    return [Path(text)]


def bytes_column(path: Path, cfg: DataConfig) -> str:
    """The image-bytes column of a parquet file ("" when it has none, i.e. it is a table of paths)."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"could not read parquet file {str(path)!r} ({type(e).__name__}: {e})") from None
    if cfg.image_bytes_col:
        if cfg.image_bytes_col not in schema.names:
            raise DataError(f"{str(path)!r} has no column {cfg.image_bytes_col!r} (data.image_bytes_col); columns "
                            f"present: {', '.join(schema.names)}")
        return cfg.image_bytes_col
    for name in BYTES_COLUMN_CANDIDATES:
        if name in schema.names and _is_bytes(schema.field(name).type):
            return name
    return ""


def resolve(spec: Spec, cfg: DataConfig) -> tuple[str, list[Path]]:
    """("table" | "shards" | "bytes", files): what kind of input ``spec`` names."""
    files = expand(spec)
    if not files:
        raise DataError("no data files given; set data.train_csv_path / data.val_csv_path")
    tars = [is_tar(p) for p in files]
    if all(tars):
        return "shards", files
    if any(tars):
        raise DataError(f"{', '.join(map(str, files[:3]))}...: mix webdataset shards (.tar) with tables; "
                        "give one kind of input")
    if all(p.suffix.lower() in (".parquet", ".pq") and p.is_file() for p in files):
        kinds = {bool(bytes_column(p, cfg)) for p in files}
        if kinds == {True}:
            return "bytes", files
        if len(files) > 1:
            raise DataError(f"{len(files)} parquet files given, but they lack an image-bytes column (set "
                            "data.image_bytes_col); a table of image paths is read from one file")
    if len(files) > 1:
        raise DataError(f"{len(files)} tables given ({str(files[0])!r}, ...); give one CSV/parquet table of "
                        "image paths, or webdataset .tar shards, or parquet files with image bytes")
    return "table", files


def is_tar(path: Path) -> bool:
    """A webdataset shard: ``.tar``, or gzipped ``.tar.gz`` / ``.tgz`` (each read whole once: members.py)."""
    return Path(path).name.lower().endswith(TAR_SUFFIXES)


def shard_stem(path: Path) -> str:
    name = Path(path).name
    return next(name[:-len(s)] for s in TAR_SUFFIXES if name.lower().endswith(s))


# ----------------------------------------------------------------------------- readers
def read_shards(shards: Sequence[Path], cfg: DataConfig) -> pd.DataFrame:
    """One row per sample key of every shard: key, image locator ("" when the sample has no image),
    caption (the ``.txt`` member, else the json's ``caption``), the json's scalar fields and
    ``data.shard_meta_cols`` of the metadata parquet beside the shard."""
    rows = []
    for shard in shards:
        shard = Path(shard)
        if not shard.is_file():
            raise DataError(f"webdataset shard {str(shard)!r} does not exist; check data.train_csv_path")
        try:
            samples = _shard_samples(shard.resolve())
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"could not read webdataset shard {str(shard)!r} ({type(e).__name__}: {e}); "
                            "check that it is a tar (or a gzipped tar)") from None
        rows.extend(_join_meta(samples, shard, cfg.shard_meta_cols) if cfg.shard_meta_cols else samples)
    df = pd.DataFrame(rows)
    if df.empty:
        raise DataError(f"the webdataset shards ({str(shards[0])!r}, ...) hold no samples")
    return _with_id(df.fillna({LOCATOR_COLUMN: ""}), cfg)


def read_bytes_tables(files: Sequence[Path], cfg: DataConfig) -> pd.DataFrame:
    """Every column but the image bytes of each file (read a column at a time, the bytes left on disk),
    with a locator of each row's image cell."""
    parts = []
    for path in files:
        path = Path(path).resolve()
        col = bytes_column(path, cfg)
        if not col:
            raise DataError(f"parquet file {str(path)!r} has no image-bytes column "
                            f"({' / '.join(BYTES_COLUMN_CANDIDATES)} of binary type); set data.image_bytes_col")
        f = pq.ParquetFile(path)
        keep = [c for c in f.schema_arrow.names if c != col and not _is_bytes(f.schema_arrow.field(c).type)]
        df = f.read(columns=keep).to_pandas()
        if LOCATOR_COLUMN in df.columns:
            df = df.drop(columns=[LOCATOR_COLUMN])
        df.insert(0, LOCATOR_COLUMN, [parquet_locator(str(path), i, col) for i in range(len(df))])
        where = (f"key {k}" for k in df["key"]) if "key" in df.columns else (f"row {i}" for i in range(len(df)))
        df[WHERE_COLUMN] = [f"file {path.name}, {w}" for w in where]
        parts.append(df)
    return _with_id(pd.concat(parts, ignore_index=True), cfg)


def _is_bytes(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return any(t.field(i).name == "bytes" and _is_bytes(t.field(i).type) for i in range(t.num_fields))
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _with_id(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Fill ``data.id_col`` from ``uid`` / ``key`` when the input has no such column."""
    if cfg.id_col not in df.columns:
        for name in ID_FALLBACKS:
            if name in df.columns:
                df.insert(0, cfg.id_col, df[name])
                break
    return df


def _join_meta(samples: list[dict], shard: Path, cols: str) -> list[dict]:
    """img2dataset's per-shard metadata (``00000.parquet`` beside ``00000.tar``: key, caption, url, status,
    uid and the other columns it was asked to save) joined to the shard's samples by key."""
    path = shard.with_name(shard_stem(shard) + ".parquet")
    if not path.is_file():
        raise DataError(f"no metadata parquet {str(path)!r} beside shard {str(shard)!r} (data.shard_meta_cols="
                        f"{cols!r}); set data.shard_meta_cols='' to read the shards alone")
    names = pq.read_schema(path).names
    if "key" not in names:
        raise DataError(f"metadata parquet {str(path)!r} has no 'key' column to join the shard's samples by")
    have = set().union(*samples) if samples else set()
    wanted = ([c for c in names if c not in have and c != "key"] if cols.strip() == "*"
              else [c.strip() for c in cols.split(",") if c.strip()])
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"metadata parquet {str(path)!r} has no column(s) {missing} (data.shard_meta_cols); "
                        f"columns present: {', '.join(names)}")
    meta = pq.read_table(path, columns=["key", *wanted]).to_pandas()
    meta = meta.assign(key=meta["key"].astype(str)).drop_duplicates("key").set_index("key")
    meta = meta.drop(columns=[c for c in (LOCATOR_COLUMN, WHERE_COLUMN) if c in meta.columns]).to_dict("index")
    for s in samples:
        s.update(meta.get(s["key"], {}))
    return samples


def _shard_samples(shard: Path) -> list[dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(shard, "r:*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            if "." not in base or base.startswith("."):
                continue
            key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
            ext = base.split(".", 1)[1].lower()
            s = samples.setdefault(key, {"key": key, WHERE_COLUMN: f"shard {shard.name}, key {key}"})
            if ext in IMAGE_EXTENSIONS and LOCATOR_COLUMN not in s:
                s[LOCATOR_COLUMN] = tar_locator(str(shard), m.name, m.offset_data, m.size)
            elif ext == "txt":
                s["caption"] = tf.extractfile(m).read().decode("utf-8", errors="replace")
            elif ext == "json":
                s.update(_json_fields(tf.extractfile(m).read(), s))
    return list(samples.values())


def _json_fields(data: bytes, sample: dict) -> dict:
    """The scalar fields of a sample's json (img2dataset: url, uid, caption, width, status, ...);
    a ``.txt`` caption already read wins over the json's."""
    try:
        meta = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(meta, dict):
        return {}
    out = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
    out.pop("key", None)  # the member key is the sample's key
    out.pop(LOCATOR_COLUMN, None)
    out.pop(WHERE_COLUMN, None)
    if "caption" in sample:
        out.pop("caption", None)
    return out
