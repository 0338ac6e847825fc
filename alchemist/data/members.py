"""Images stored inside a container (a webdataset tar shard, a parquet file), named by one string.

A pairs table keeps one text cell per image, ``image_path``; for an image inside a container that
cell holds a *locator* instead of a file path, so that every reader (the dataset, the pre-pass, the
feature cache, scoring's fingerprint) keeps working on a column of strings that forked DataLoader
workers share cheaply, and each image is read only when it is decoded:

  ``tar:<offset>+<size>:<shard path>#<member name>``   the member's bytes at that offset of the tar
                                                       (of the decompressed tar for ``.tar.gz``)
  ``parquet:<row>:<file path>#<column>``               the cell of a binary (or {bytes: ...}) column

A file path read from a table is absolute (``load_pairs`` resolves it), so it never starts with a
scheme; the member name and column after the last ``#`` serve messages and the parquet column.
"""
from __future__ import annotations

import functools
import gzip
import io
import os

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMES = ("tar:", "parquet:")
GZIP_SUFFIXES = (".tar.gz", ".tgz")


class NoImage(OSError):
    """The sample has no image: a null or empty bytes cell."""


def tar_locator(shard: str, member: str, offset: int, size: int) -> str:
    return f"tar:{offset}+{size}:{shard}#{member}"


def parquet_locator(path: str, row: int, column: str) -> str:
    return f"parquet:{row}:{path}#{column}"


def is_member(path: str) -> bool:
    return path.startswith(SCHEMES)


def parse(locator: str) -> tuple[str, str, str, str]:
    """(scheme, position, container path, name) of a locator."""
    scheme, _, rest = locator.partition(":")
    position, _, rest = rest.partition(":")
    container, _, name = rest.rpartition("#")
    return scheme, position, container, name


def container(locator: str) -> str:
    return parse(locator)[2]


def describe(locator: str) -> str:
    """Where a member lives, for skip reasons: ``shard 00001.tar, member 000000042.jpg``."""
    scheme, position, path, name = parse(locator)
    if scheme == "tar":
        return f"shard {os.path.basename(path)}, member {name}"
    return f"file {os.path.basename(path)}, row {position}"


def read_bytes(locator: str) -> bytes:
    """The member's encoded bytes; raises OSError (or what pyarrow raises) when they cannot be read."""
    scheme, position, path, name = parse(locator)
    if scheme == "tar":
        offset, _, size = position.partition("+")
        if path.lower().endswith(GZIP_SUFFIXES):  # offsets are into the decompressed stream
            data = _gunzipped(path)[int(offset):int(offset) + int(size)]
        else:
            with open(path, "rb") as f:
                f.seek(int(offset))
                data = f.read(int(size))
        if len(data) != int(size):
            raise OSError(f"tar member cut short ({len(data)} of {size} bytes)")
        return data
    if scheme == "parquet":
        row = int(position)
        starts, file_rows = _row_group_starts(path)
        if not 0 <= row < file_rows:
            raise OSError(f"row {row} is past the end of the file ({file_rows} rows)")
        rg = max(i for i, s in enumerate(starts) if s <= row)
        cell = _row_group_column(path, rg, name)[row - starts[rg]].as_py()
        if isinstance(cell, dict):
            cell = cell.get("bytes")
        if not cell:
            raise NoImage("empty image cell")
        return cell
    raise ValueError(f"not a member locator: {locator!r}")


def open_image_file(path: str):
    """What ``PIL.Image.open`` takes for ``path``: the path itself, or the member's bytes as a file."""
    return io.BytesIO(read_bytes(path)) if is_member(path) else path


@functools.lru_cache(maxsize=2)
def _gunzipped(path: str) -> bytes:
    """A gzipped shard decompressed whole (gzip has no random access; cached: a sequential reader, as
    every loader here is, decompresses each shard once, holding one or two shards in memory)."""
    with gzip.open(path, "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=64)
def _row_group_starts(path: str) -> tuple[list[int], int]:
    meta = pq.ParquetFile(path).metadata
    starts, n = [], 0
    for i in range(meta.num_row_groups):
        starts.append(n)
        n += meta.row_group(i).num_rows
    return starts, n


@functools.lru_cache(maxsize=4)
def _row_group_column(path: str, rg: int, column: str) -> pa.Array:
    """One row group's image column (cached: a sequential reader decodes each row group once)."""
    return pq.ParquetFile(path).read_row_group(rg, columns=[column]).column(0).combine_chunks()
