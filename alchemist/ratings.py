"""Ratings tables: the pairs table's columns plus ``score`` (higher = better) and ``rank``.

A ratings table is sorted best first: ``rank`` 0 is the highest score, ties go to
the smaller ``id`` so that equal scores rank the same way on every run. The file
format follows the extension (``.csv``, or ``.parquet`` / ``.pq``).

CSV columns other than ``score`` and ``rank`` are read back as text, exactly as
written, so that ids like ``007`` and captions like ``NA`` survive a round trip
and a pruned subset repeats the input rows verbatim. Parquet keeps its types.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from alchemist.utils.errors import UserError
from alchemist.utils.io import atomic_open

REQUIRED = ("id", "score", "rank")


def table_format(path: str | os.PathLike) -> str:
    """'csv' or 'parquet' from the file name; anything else is a user error."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise UserError(f"{path}: unknown table format {suffix!r}; name the file .csv or .parquet")


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Any table (CSV as text, parquet as typed) chosen by extension."""
    path = Path(path)
    fmt = table_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such table file")
    try:
        if fmt == "parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False, engine="pyarrow")
    except (ValueError, pa.ArrowException) as e:  # an empty file, a broken one, not a table at all
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"could not read table {str(path)!r} ({type(e).__name__}: {first}); check that it is a "
                        f"valid {fmt} file") from None


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename) in the format the extension names."""
    fmt = table_format(path)
    with atomic_open(path, "wb") as f:
        if fmt == "parquet":
            df.to_parquet(f, index=False)
        else:
            df.to_csv(f, index=False)
    return Path(path)


def rank_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Sort by score descending (ties: id ascending) and set ``rank`` = 0..N-1."""
    _require(df, ("id", "score"), "table")
    score = pd.to_numeric(df["score"], errors="coerce")
    if score.isna().any():
        raise UserError(f"{int(score.isna().sum())} rows have a missing or non-numeric score; "
                         "drop them before ranking")
    out = df.assign(score=score.astype(np.float64)).sort_values(
        ["score", "id"], ascending=[False, True], kind="stable", ignore_index=True)
    out["rank"] = np.arange(len(out), dtype=np.int64)
    return out


def write_ratings(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a ratings table atomically, (re-)ranking it unless it is already ranked and sorted."""
    _require(df, ("id", "score"), "ratings")
    score = df["score"].to_numpy()
    sorted_ = pd.api.types.is_numeric_dtype(score) and bool(np.all(score[1:] <= score[:-1]))
    if not (sorted_ and "rank" in df.columns and _is_ranked(df)):
        df = rank_scores(df)
    return write_table(df, path)


def read_ratings(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ratings table, check it, and return it sorted by rank (row i has rank i)."""
    df = read_table(path)
    _require(df, REQUIRED, f"ratings file {path}")
    df["score"] = pd.to_numeric(df["score"], errors="raise").astype(np.float64)
    df["rank"] = pd.to_numeric(df["rank"], errors="raise").astype(np.int64)
    bad = int((~np.isfinite(df["score"].to_numpy())).sum())
    if bad:
        raise UserError(f"ratings file {path}: {bad} rows have a NaN or infinite score; rescore or drop them")
    dup = df["id"].astype(str).duplicated()
    if dup.any():
        raise UserError(f"ratings file {path}: {int(dup.sum())} ids appear more than once (first: "
                         f"{df.loc[dup, 'id'].iloc[0]!r}); each pair must be rated once")
    if not _is_ranked(df):
        rank = df["rank"].to_numpy()
        if len(rank) and (rank.min() != 0 or rank.max() != len(rank) - 1
                          or np.bincount(rank, minlength=len(rank)).max() != 1):
            raise UserError(f"ratings file {path}: 'rank' is not a permutation of 0..N-1; "
                             "rewrite it with alchemist.ratings.write_ratings")
        df = df.sort_values("rank", kind="stable", ignore_index=True)
    return df


def _is_ranked(df: pd.DataFrame) -> bool:
    return np.array_equal(df["rank"].to_numpy(), np.arange(len(df)))


def _require(df: pd.DataFrame, cols: tuple[str, ...], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(f"{what} lacks column(s) {missing}; a ratings table needs {list(REQUIRED)} "
                         f"(it has {list(df.columns)})")
