"""Test helpers: the rows of a pairs table written as webdataset tar shards or as parquet with the image
bytes embedded (the layouts img2dataset writes), so that the same pairs can be read from all three."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(table: pd.DataFrame, root: Path, shard_rows: int, caption_in: str = "txt",
                 uid: bool = False) -> list[Path]:
    """``table`` (id, absolute image_path, caption, ...) as ``root/00000.tar``, ...: per row ``<id>.<ext>``
    (the file's bytes), the caption as ``<id>.txt`` (or in the json, ``caption_in="json"``) and
    ``<id>.json`` with the other columns (and ``uid`` = ``u<id>`` when ``uid``)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, lo in enumerate(range(0, len(table), shard_rows)):
        path = root / f"{k:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for _, row in table.iloc[lo:lo + shard_rows].iterrows():
                key, img = str(row["id"]), Path(row["image_path"])
                meta = {c: row[c] for c in table.columns if c not in ("id", "image_path", "caption")}
                if uid:
                    meta["uid"] = f"u{key}"
                if caption_in == "json":
                    meta["caption"] = row["caption"]
                else:
                    _add(tf, f"{key}.txt", str(row["caption"]).encode())
                if img.is_file():
                    _add(tf, f"{key}{img.suffix.lower()}", img.read_bytes())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
        paths.append(path)
    return paths


def write_bytes_parquet(table: pd.DataFrame, path: Path, column: str = "jpg", row_group_size: int = 4) -> Path:
    """``table`` as one parquet file: ``key`` (the id), ``caption``, the image file's bytes in ``column``
    (null where the file is missing) and the other columns."""
    data = {"key": table["id"].astype(str).tolist(), "caption": table["caption"].tolist(),
            column: [Path(p).read_bytes() if Path(p).is_file() else None for p in table["image_path"]]}
    for c in table.columns:
        if c not in ("id", "image_path", "caption"):
            data[c] = table[c].tolist()
    pq.write_table(pa.table(data), path, row_group_size=row_group_size)
    return path
