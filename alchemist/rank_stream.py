"""Rank and prune ratings kept in many parquet files (scoring's per-shard files) without loading them.

``prune_table`` reads the whole ratings table (ids, paths, captions) to sort it: about 8 GiB at 30 M
rows. Here the files are read in chunks of two columns (id, score), twice:
  1. the scores alone are collected and sorted (8 bytes a row; the ids of tied scores too, if any);
  2. each row's exact rank is ``#(higher scores) + #(equal scores with a smaller id)``, a binary search
     in the sorted scores: the order ``alchemist.ratings.rank_scores`` gives (score down, then id up);
the selection itself runs on rank positions (``selection.select(N, ...)``, with Shift-Gsample's tail
found from the sorted scores exactly as ``prune_table`` finds it), into a keep mask of 1 byte a rank.
Peak memory is then ~9 bytes a row plus one chunk, and the kept set equals ``prune_table``'s.

Input rows with a non-empty ``skipped`` column (scoring's shard files list the skipped rows) are not
ranked. Ids are assumed unique (scoring guarantees it; ``read_ratings`` checks it in memory).
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alchemist.selection import resolve_params, select
from alchemist.utils.errors import UserError
from alchemist.utils.io import atomic_open

DEFAULT_CHUNK_ROWS = 1 << 20
UID_HEX = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass
class Ranked:
    """One chunk of one file: its (ranked) rows' ids, scores and exact global ranks."""
    file: Path
    ids: pa.Array
    score: np.ndarray
    rank: np.ndarray
    valid: np.ndarray  # which rows of the chunk are ranked (False: a skipped row, rank -1)


def ratings_files(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Parquet files named by a folder (its ``*.parquet``, e.g. ``ratings.parquet.shards``), a glob,
    one file or a list of those; in sorted order within each folder or glob."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in ratings_files(s)]
    text = os.fspath(spec)
    if os.path.isdir(text):
        found = sorted(Path(text).glob("*.parquet"))
    elif glob.has_magic(text):
        found = [Path(p) for p in sorted(glob.glob(text))]
    else:
        found = [Path(text)] if os.path.isfile(text) else []
    if not found:
        raise UserError(f"no ratings parquet files at {text!r}; pass the scoring shards folder "
                        "(<ratings>.shards), a glob or parquet files")
    return found


def _chunks(files: Sequence[Path], chunk_rows: int) -> Iterator[tuple[Path, pa.Array, np.ndarray, np.ndarray]]:
    """(file, ids, scores, valid) per chunk; valid = not skipped (scores there must be finite)."""
    for path in files:
        f = pq.ParquetFile(path)
        names = f.schema_arrow.names
        missing = [c for c in ("id", "score") if c not in names]
        if missing:
            raise UserError(f"ratings file {str(path)!r} lacks column(s) {missing}; per-shard ratings need id "
                            "and score")
        cols = ["id", "score"] + (["skipped"] if "skipped" in names else [])
        for batch in f.iter_batches(batch_size=chunk_rows, columns=cols):
            ids = batch.column("id").cast(pa.string())
            score = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
            if "skipped" in cols:
                sk = batch.column("skipped")
                valid = pc.fill_null(pc.equal(sk, ""), True).to_numpy(zero_copy_only=False)
            else:
                valid = np.ones(len(score), bool)
            bad = valid & ~np.isfinite(score)
            if bad.any():
                raise UserError(f"ratings file {str(path)!r}: {int(bad.sum())} rows have a NaN or infinite score; "
                                "rescore or drop them")
            yield path, ids, score, valid


class StreamRanker:
    """Exact global ranks of the rows of many ratings files (score down, id up), streamed."""

    def __init__(self, files: Sequence[Path], chunk_rows: int = DEFAULT_CHUNK_ROWS):
        self.files, self.chunk_rows = list(files), int(chunk_rows)
        parts = [s[v] for _, _, s, v in _chunks(self.files, self.chunk_rows)]
        scores = np.concatenate(parts) if parts else np.zeros(0)
        del parts
        scores.sort()  # in place: two copies of N scores at the peak, not three
        self.sorted_scores = scores
        self.n = len(self.sorted_scores)
        if self.n == 0:
            raise UserError("the ratings files hold no rated rows")
        s = self.sorted_scores
        tied = self._tied = np.unique(s[1:][s[1:] == s[:-1]])
        self._ties: dict[tuple[float, str], int] = {}
        if len(tied):  # rare with float scores: the ids of the tied rows decide their order
            groups: dict[float, list[str]] = {}
            for _, ids, score, valid in _chunks(self.files, self.chunk_rows):
                hit = valid & np.isin(score, tied)
                for i in np.flatnonzero(hit):
                    groups.setdefault(float(score[i]), []).append(ids[int(i)].as_py())
            for value, group in groups.items():
                self._ties.update(((value, id), j) for j, id in enumerate(sorted(group)))

    def ranked(self) -> Iterator[Ranked]:
        for path, ids, score, valid in _chunks(self.files, self.chunk_rows):
            rank = np.full(len(score), -1, np.int64)
            v = np.flatnonzero(valid)
            rank[v] = self.n - np.searchsorted(self.sorted_scores, score[v], side="right")
            if self._ties:
                for i in v[np.isin(score[v], self._tied)]:
                    rank[i] += self._ties.get((float(score[i]), ids[int(i)].as_py()), 0)
            yield Ranked(path, ids, score, rank, valid)


def keep_mask(ranker: StreamRanker, strategy: str, retention: float | int, seed: int = 0,
              reference: np.ndarray | None = None, **params) -> tuple[np.ndarray, dict[str, float]]:
    """(kept[rank position] as a bool array of N, the parameters used), as ``prune_table`` selects."""
    used = resolve_params(strategy, ranker.n, retention, ranker.sorted_scores, reference, **params)
    keep = np.zeros(ranker.n, bool)
    keep[select(ranker.n, strategy, retention, seed, **used)] = True
    return keep, used


def prune_stream(files: Sequence[Path], strategy: str, retention: float | int, seed: int = 0, *,
                 out: str | os.PathLike | None = None, keep_dir: str | os.PathLike | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, reference: np.ndarray | None = None, **params) -> dict:
    """Select from per-file ratings and write the subset as
      * ``out`` ``.npy``: the kept ids sorted (DataComp's subset format: 128-bit hex uids as sorted
        ``(u8, u8)`` pairs when every id is one, else a sorted string array);
      * ``out`` ``.parquet`` / ``.csv``: the kept ids with score and rank, in rank order;
      * ``keep_dir``: each input file again, same name, with ``rank`` (-1: skipped) and a boolean ``keep``.
    ``reference``: trusted pairs' scores for Shift-Gsample's tail, as in ``selection.select``.
    Returns n, kept, the parameters used and the kept ranks' histogram input (``kept_ranks``)."""
    ranker = StreamRanker(files, chunk_rows)
    keep, used = keep_mask(ranker, strategy, retention, seed, reference, **params)
    kept_ids, kept_scores, kept_ranks = [], [], []
    writers: dict[Path, tuple[pq.ParquetWriter, Iterator[pa.RecordBatch]]] = {}
    if keep_dir is not None:
        Path(keep_dir).mkdir(parents=True, exist_ok=True)
    try:
        for chunk in ranker.ranked():
            k = np.zeros(len(chunk.rank), bool)
            k[chunk.valid] = keep[chunk.rank[chunk.valid]]
            if out is not None:
                kept_ids.append(chunk.ids.filter(pa.array(k)))
                kept_scores.append(chunk.score[k])
            kept_ranks.append(chunk.rank[k])
            if keep_dir is not None:
                _write_keep(writers, chunk, k, Path(keep_dir), chunk_rows)
    finally:
        for w, _ in writers.values():
            w.close()
    ranks = np.concatenate(kept_ranks)
    if out is not None:
        _write_subset(Path(out), pa.chunked_array(kept_ids, pa.string()).combine_chunks(),
                      np.concatenate(kept_scores), ranks)
    if keep_dir is not None:
        _finish_keep(writers, Path(keep_dir))
    return {"n": ranker.n, "kept": int(keep.sum()), "params": used, "kept_ranks": np.sort(ranks)}


def _write_keep(writers: dict, chunk: Ranked, k: np.ndarray, root: Path, chunk_rows: int) -> None:
    """Append the chunk's full input rows with rank and keep to ``root/<file name>`` (a temp name until done)."""
    if chunk.file not in writers:
        f = pq.ParquetFile(chunk.file)
        schema = f.schema_arrow
        for c in ("rank", "keep"):
            if c in schema.names:
                schema = schema.remove(schema.get_field_index(c))
        schema = schema.append(pa.field("rank", pa.int64())).append(pa.field("keep", pa.bool_()))
        # the full rows, read in the same chunks as _chunks read the ids and scores
        writers[chunk.file] = (pq.ParquetWriter(root / (chunk.file.name + ".tmp"), schema),
                               f.iter_batches(batch_size=chunk_rows))
    writer, source = writers[chunk.file]
    batch = next(source)
    table = pa.Table.from_batches([batch]).drop_columns([c for c in ("rank", "keep") if c in batch.schema.names])
    table = table.append_column("rank", pa.array(chunk.rank)).append_column("keep", pa.array(k))
    writer.write_table(table)


def _finish_keep(writers: dict, root: Path) -> None:
    for path in writers:
        os.replace(root / (path.name + ".tmp"), root / path.name)


def _write_subset(out: Path, ids: pa.Array, score: np.ndarray, rank: np.ndarray) -> None:
    suffix = out.suffix.lower()
    if suffix == ".npy":
        values = ids.to_numpy(zero_copy_only=False).astype(str)
        if len(values) and all(UID_HEX.match(v) for v in values):
            arr = np.array([(int(v[:16], 16), int(v[16:], 16)) for v in values], np.dtype("u8,u8"))
        else:
            arr = values
        with atomic_open(out, "wb") as f:
            np.save(f, np.sort(arr))
        return
    order = np.argsort(rank, kind="stable")
    table = pa.table({"id": ids.take(pa.array(order)), "score": score[order], "rank": rank[order]})
    with atomic_open(out, "wb") as f:
        if suffix in (".parquet", ".pq"):
            pq.write_table(table, f)
        elif suffix == ".csv":
            table.to_pandas().to_csv(f, index=False)
        else:
            raise UserError(f"{out}: unknown subset format {suffix!r}; name it .npy, .parquet or .csv")


def check_out(out: str | os.PathLike) -> None:
    """A bad ``out`` extension fails before any reading."""
    if Path(out).suffix.lower() not in (".npy", ".parquet", ".pq", ".csv"):
        raise UserError(f"{out}: unknown subset format {Path(out).suffix!r}; name it .npy, .parquet or .csv")

