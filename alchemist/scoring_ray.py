"""Rate a dataset with Ray Data: the input's own shards are the unit of work, an actor pool scores them.

The torch engine (``scoring.py``) cuts one in-memory table into fixed row shards over the ranks of a
torchrun job. Here each *part* is one input shard (a webdataset tar, a parquet file with image bytes;
a table of image paths is cut into ``shard_rows`` row ranges), read with the project's reader
(``load_pairs``: the same ids, checks and skip reasons) by one actor of a pool: one actor per GPU,
or per CPU less one (``pool_size``). Each actor loads the models as ``rate_file`` does
(``scoring.build_scorer``) and batches a part's rows as ``score_table`` batches a shard
(``scoring.pool_rows``, ``scoring.shard_frame``), so a pair batched the same way gets the same fp32
score, bit for bit, from either engine (and one within fp32 rounding otherwise, as with ``--bs``).
The Ray dataset is the list of parts rather than ``ray.data.read_webdataset``'s samples: Ray's
reader groups members and decodes images its own way, while the project's reader keeps the ids,
skip reasons and pixels of the other engine, and a whole part per call keeps its batches intact.

An actor writes its part atomically to ``<out>.shards/part_XXXXX.parquet`` (the input columns,
``row``, ``score``, and ``skipped``: the reason, empty for scored rows); that file is the part's
completion marker, so a rerun after a kill scores only the parts without one. A part that cannot
be read at all (a corrupt tar) is reported in ``part_XXXXX.failed.json`` and retried by the next
run; the others go on. The ratings file is then written in one streaming pass with exact ranks
(``rank_stream.StreamRanker``: score down, id up), in part order rather than sorted
(``read_ratings`` sorts it); at scale prune the ``.shards`` folder itself (``scripts/prune.py``).

There is no ``official_score``: it is a softmax over fixed 256-row batches of the whole table's row
order, which a part scored on its own does not know. It is a comparison column; the torch engine
keeps it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from alchemist.config import config_to_dict
from alchemist.data import sources
from alchemist.data.pairs import PairsDataset, SkipLog, collate_pairs, load_pairs, reason_kind
from alchemist.rank_stream import StreamRanker
from alchemist.ratings import table_format
from alchemist.scoring import (DEFAULT_SHARD_ROWS, claim, load_rater, pool_rows, scoring_config,
                               shard_frame, shards_dir, skipped_path, table_sha1, write_shard)
from alchemist.utils.checkpoint import state_sha1
from alchemist.utils.errors import UserError
from alchemist.utils.io import atomic_open, check_writable, remove_stale_temps

PREFETCH_BATCHES = 2  # decoded batches in flight per actor beyond the one being scored
INTERNAL = ("row", "skipped")  # part-file columns that are not the input's
OWN = INTERNAL + ("score", "official_score", "rank")  # an input column of one of these names is replaced


@dataclasses.dataclass(frozen=True)
class Part:
    """One unit of work: a whole input file, or rows [lo, hi) of the path table."""
    k: int
    file: str
    lo: int = 0
    hi: int = -1

    @property
    def name(self) -> str:
        return f"part_{self.k:05d}"

    def describe(self) -> str:
        base = os.path.basename(self.file)
        return base if self.hi < 0 else f"{base} rows {self.lo}-{self.hi - 1}"


def part_file(root: Path, part: Part) -> Path:
    return root / f"{part.name}.parquet"


def failed_file(root: Path, part: Part) -> Path:
    return root / f"{part.name}.failed.json"


def import_ray():
    """``ray`` with Ray Data, or a UserError saying how to install it (it is an optional extra)."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError("--engine ray needs Ray Data: pip install 'ray[data]' (or pip install -e '.[ray]'; "
                        "make env installs it); or score with the default --engine torch") from None
    return ray


def pool_size(resources: dict) -> tuple[int, dict]:
    """(actors, resources of one actor) from ``ray.cluster_resources()``: one actor per GPU, sharing the
    CPUs but one; on CPUs only, one single-CPU actor per CPU but one, at least 1. The free CPU is for
    Ray Data's own tasks: actors holding every CPU can leave them unscheduled, and the job hangs."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        return gpus, {"num_gpus": 1, "num_cpus": max(1, (cpus - 1) // gpus)}
    return max(1, cpus - 1), {"num_cpus": 1}


# ----------------------------------------------------------------------------- the actor
class PartScorer:
    """Ray Data actor: scores whole parts and writes each one's file; returns one summary row a part."""

    def __init__(self, ckpt: str, overrides: Sequence[str], root: str, parts: dict[int, Part],
                 batch_size: int, table=None, threads: int = 1):
        import torch

        from alchemist.scoring import build_scorer

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray sets the visible GPU
        if device.type == "cpu":
            torch.set_num_threads(threads)
        self.root, self.parts, self.batch_size, self.threads = Path(root), parts, batch_size, threads
        self.setup_error = ""
        try:
            self.rater, self.cfg, self.featurizer = build_scorer(ckpt, overrides, device)
        except (UserError, OSError) as e:  # a bad model path: said once by the driver, not as an actor's death
            self.setup_error = str(e)
            return
        # the load-time image pre-pass runs on this actor's threads
        self.data_cfg = dataclasses.replace(self.cfg.data, num_workers=threads)
        if table is not None and not isinstance(table, pd.DataFrame):  # an ObjectRef: one copy per node
            import ray

            table = ray.get(table)
        self.table = table  # the path table (a table input only)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = collections.defaultdict(list)
        for k in batch["part"]:
            part = self.parts[int(k)]
            t0 = time.perf_counter()
            if self.setup_error:
                frame, error = None, self.setup_error
            else:
                frame, error = self._score_and_write(part)
            out["part"].append(part.k)
            out["rows"].append(0 if frame is None else len(frame))
            out["skipped"].append(0 if frame is None else int((frame["skipped"] != "").sum()))
            out["error"].append(error)
            out["fatal"].append(bool(self.setup_error))
            out["seconds"].append(time.perf_counter() - t0)
        return {k: np.asarray(v) for k, v in out.items()}

    def _score_and_write(self, part: Part) -> tuple[pd.DataFrame | None, str]:
        try:
            frame = self.score_part(part)
        except Exception as e:  # an unreadable part is reported and retried by the next run, not fatal
            reason = f"unreadable part: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            with atomic_open(failed_file(self.root, part)) as f:
                json.dump({"part": part.describe(), "reason": reason}, f)
            return None, reason
        write_shard(part_file(self.root, part), frame)
        failed_file(self.root, part).unlink(missing_ok=True)
        return frame, ""

    def read_part(self, part: Part) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
        """The part's pairs (``load_pairs`` of its file, or its rows of the path table) and the rows
        ``load_pairs`` skipped, as (id, reason)."""
        if part.hi >= 0:
            return self.table.iloc[part.lo:part.hi].reset_index(drop=True), []
        log = SkipLog()
        return load_pairs([part.file], self.data_cfg, log, allow_empty=True), log.items

    def score_part(self, part: Part) -> pd.DataFrame:
        pairs, load_skips = self.read_part(part)
        pairs = pairs.drop(columns=[c for c in OWN if c in pairs.columns])
        ids = pairs["id"].to_numpy()
        rows, p_NC, bad = pool_rows(self.rater, self.featurizer, self.cfg, ids, self._decoded(pairs))
        scored = shard_frame(self.rater, 0, ids, rows, p_NC, bad).drop(columns=["official_score", "id"])
        frame = pairs.join(scored.set_index("row"), how="left")
        frame.insert(0, "row", np.arange(len(pairs), dtype=np.int64))
        if load_skips:  # rows load_pairs left out: listed with a NaN score, as decode failures are
            skipped = pd.DataFrame({"id": [i for i, _ in load_skips], "skipped": [r for _, r in load_skips],
                                    "row": np.int64(-1), "score": np.nan})
            frame = pd.concat([frame, skipped], ignore_index=True)
        for c in frame.columns:  # an all-null object column has no parquet type of its own
            if frame[c].dtype == object and frame[c].isna().all():
                frame[c] = frame[c].astype("string")
        frame["skipped"] = frame["skipped"].fillna("").astype(str)
        return frame

    def _decoded(self, pairs: pd.DataFrame) -> Iterator[tuple[range, dict]]:
        """Collated batches of ``batch_size`` consecutive rows (as ``score_table`` forms them), decoded on
        the actor's threads a few batches ahead."""
        dataset = PairsDataset(pairs, self.cfg.data.image_size, caption_dropout=0.0)
        bounds = [range(lo, min(lo + self.batch_size, len(pairs))) for lo in range(0, len(pairs), self.batch_size)]
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            queue: collections.deque = collections.deque()
            for b in bounds:
                queue.append((b, [pool.submit(dataset.__getitem__, i) for i in b]))
                if len(queue) > PREFETCH_BATCHES:
                    rows, items = queue.popleft()
                    yield rows, collate_pairs([f.result() for f in items])
            while queue:
                rows, items = queue.popleft()
                yield rows, collate_pairs([f.result() for f in items])


# ----------------------------------------------------------------------------- the driver
def plan(spec: sources.Spec, cfg, shard_rows: int) -> tuple[list[Part], pd.DataFrame | None, list]:
    """The parts of the input, the path table (table input only) and the rows its loading skipped."""
    kind, files = sources.resolve(spec, cfg.data)
    if kind != "table":
        return [Part(k, str(Path(f).resolve())) for k, f in enumerate(files)], None, []
    log = SkipLog()
    table = load_pairs(files[0], cfg.data, log)
    parts = [Part(k, str(files[0].resolve()), lo, min(len(table), lo + shard_rows))
             for k, lo in enumerate(range(0, len(table), shard_rows))]
    return parts, table, log.items


def _fingerprint(parts: list[Part], table: pd.DataFrame | None, rater, cfg, shard_rows: int) -> dict:
    """What the part files depend on: the input files, the rows of a path table, the rater's weights, the
    data settings; reusing parts of another job would be wrong. Shard contents are not hashed (too slow at
    scale): a shard replaced after its part was scored (a re-download) keeps its scores until its part
    file is deleted, and a failed one is retried."""
    data = {k: v for k, v in config_to_dict(cfg)["data"].items() if k not in ("num_workers", "check_images")}
    meta = {"engine": "ray", "parts": [[p.file, p.lo, p.hi] for p in parts], "rater_sha1": state_sha1(rater),
            "data": data}
    if table is not None:
        meta.update(rows=len(table), shard_rows=shard_rows, table_sha1=table_sha1(table))
    return meta


def rate_file_ray(ckpt: str | os.PathLike, spec: sources.Spec, out_path: str | os.PathLike,
                  overrides: Sequence[str] = (), batch_size: int = 256, shard_rows: int = DEFAULT_SHARD_ROWS,
                  actors: int | None = None, progress: bool = True) -> Path:
    """``infer_rater.py --engine ray``: plan the parts, score the unfinished ones on an actor pool, merge.

    Connects to the Ray cluster in ``RAY_ADDRESS`` (or the one this process already joined), else starts
    a local one. ``actors`` overrides ``pool_size``'s count (the per-actor resources stay).
    """
    ray = import_ray()
    if batch_size < 1 or shard_rows < 1:
        raise UserError(f"batch size and shard rows must be >= 1, got {batch_size} and {shard_rows}")
    out_path = Path(out_path)
    table_format(out_path)
    check_writable(out_path.parent)
    rater, cfg = load_rater(ckpt, "cpu")  # a bad checkpoint or override fails here, before any actor starts
    cfg = scoring_config(cfg, overrides)
    if cfg.data.cache_dir:
        raise UserError("--engine ray reads images, not a feature cache (data.cache_dir); use --engine torch "
                        "with --cache-dir")
    parts, table, load_skips = plan(spec, cfg, shard_rows)
    root = shards_dir(out_path)
    remove_stale_temps(root)  # what killed writes of an earlier run left
    remove_stale_temps(out_path.parent, [out_path.name, skipped_path(out_path).name])
    claim(root, _fingerprint(parts, table, rater, cfg, shard_rows))
    del rater
    todo = [p for p in parts if not part_file(root, p).exists()]
    if todo:
        _run_pool(ray, todo, ckpt, overrides, root, batch_size, table, actors, progress)
    return merge(parts, root, out_path, load_skips)


def _run_pool(ray, todo: list[Part], ckpt, overrides, root: Path, batch_size: int, table, actors, progress) -> None:
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts parts; Ray Data's warnings still show
    ctx.print_on_execution_start = False
    for name in ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING if name.endswith("executor") else logging.ERROR)
    n, resources = pool_size(ray.cluster_resources())
    n = min(actors or n, len(todo))
    ds = ray.data.from_items([{"part": p.k} for p in todo], override_num_blocks=len(todo))
    table_ref = ray.put(table) if table is not None else None
    scored = ds.map_batches(
        PartScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n), **resources,
        fn_constructor_kwargs=dict(ckpt=str(ckpt), overrides=list(overrides), root=str(root),
                                   parts={p.k: p for p in todo}, batch_size=batch_size, table=table_ref,
                                   threads=int(resources["num_cpus"])))
    bar = tqdm(total=len(todo), unit="part", dynamic_ncols=True, disable=not progress,
               desc=f"rating {len(todo)} parts on {n} Ray actor(s)")
    failed = []
    for b in scored.iter_batches(batch_size=None, batch_format="numpy"):
        if b["fatal"].any():  # the actors could not load the models: nothing will be scored
            bar.close()
            raise UserError(str(b["error"][np.flatnonzero(b["fatal"])[0]]))
        failed += [(int(k), e) for k, e in zip(b["part"], b["error"]) if e]
        bar.update(len(b["part"]))
    bar.close()
    for k, e in failed:
        print(f"warning: part {k} failed: {e}")


# ----------------------------------------------------------------------------- merge
def _unified_schema(files: Sequence[Path]) -> pa.Schema:
    """One schema for every part file's ratings rows (a column absent from some parts is null there)."""
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    fields = [f for f in schema if f.name not in INTERNAL + ("score", "rank")]
    return pa.schema(fields + [pa.field("score", pa.float64()), pa.field("rank", pa.int64())])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def merge(parts: Sequence[Part], root: Path, out_path: Path, load_skips: Sequence[tuple[str, str]] = (),
          chunk_rows: int = 1 << 20) -> Path:
    """The ratings file (input columns, score, exact rank; in part order) and ``<out stem>.skipped.csv``
    from the part files, streamed: one chunk of one part in memory at a time, plus 9 bytes a row."""
    done = [part_file(root, p) for p in parts if part_file(root, p).exists()]
    failed = [json.loads(failed_file(root, p).read_text()) for p in parts
              if not part_file(root, p).exists() and failed_file(root, p).exists()]
    missing = len(parts) - len(done) - len(failed)
    if missing:
        raise RuntimeError(f"{missing} of {len(parts)} parts have no output in {str(root)!r}; rerun to score them")
    if not done:
        raise UserError(f"no part of the input could be read ({failed[0]['part']}: {failed[0]['reason']})")
    ranker = StreamRanker(done, chunk_rows)
    schema = _unified_schema(done)
    fmt = table_format(out_path)
    counts: collections.Counter = collections.Counter()
    n_skipped = 0
    with atomic_open(out_path, "wb") as f, atomic_open(skipped_path(out_path)) as sf:
        writer = pq.ParquetWriter(f, schema) if fmt == "parquet" else pacsv.CSVWriter(f, schema)
        skip_csv = csv.writer(sf, lineterminator="\n")
        skip_csv.writerow(["id", "reason"])
        for id, reason in load_skips:
            skip_csv.writerow([id, reason])
            counts[reason_kind(reason)] += 1
        n_skipped += len(load_skips)
        sources_ = {}
        for chunk in ranker.ranked():
            if chunk.file not in sources_:
                sources_[chunk.file] = pq.ParquetFile(chunk.file).iter_batches(batch_size=chunk_rows)
            rows = pa.Table.from_batches([next(sources_[chunk.file])])
            ok = pa.array(chunk.valid)
            good = rows.filter(ok).drop_columns(["rank"] if "rank" in rows.column_names else [])
            good = good.append_column("rank", pa.array(chunk.rank[chunk.valid]))
            writer.write_table(_conform(good, schema))
            bad = rows.filter(pc.invert(ok))
            for id, reason in zip(bad.column("id").to_pylist(), bad.column("skipped").to_pylist()):
                skip_csv.writerow([id, reason])
                counts[reason_kind(reason)] += 1
            n_skipped += len(bad)
        for fail in failed:
            skip_csv.writerow([fail["part"], fail["reason"]])
            counts["unreadable part"] += 1
        n_skipped += len(failed)
        writer.close()
    detail = f" ({', '.join(f'{n} {r}' for r, n in counts.most_common())})" if counts else ""
    print(f"rated {ranker.n} pairs -> {out_path}; skipped {n_skipped}{detail}, listed in {skipped_path(out_path)}")
    if failed:
        print(f"warning: {len(failed)} part(s) could not be read (listed in the skipped file); rerun to retry them")
    return out_path
