"""Time and memory of pruning at scale (``scripts/bench.py prune``; docs/selection.md records the results).

Each case runs in a fresh child process so that its peak RSS is its own:
  * ``select``: every strategy on N rank positions (``select(N, ...)``), and once from an
    unsorted score array (which adds the argsort that ranks it);
  * ``table`` (with ``table=True``): a synthetic N-row ratings parquet (id, image_save_path, caption,
    score, rank) pruned end to end: read_ratings → prune_table → write_table (parquet);
  * ``shards`` (with ``table=True``): the same rows as per-shard ratings files (id, score, skipped, as
    scoring writes them; ``SHARD_ROWS`` a file, in scoring's row order, unsorted) pruned by the
    streaming path (``rank_stream.prune_stream``) into a kept-ids parquet: rows/s and peak memory
    against the in-memory ``table`` row.
Peak memory is reported as the child's peak RSS minus its RSS before the case, and for the
numpy-only cases also as tracemalloc's peak (numpy reports its buffers to tracemalloc).
The child runs this module (``python -m alchemist.bench.prune CASE_JSON``), which imports no torch.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

SHARD_ROWS = 1 << 20
STRATEGY_CASES = ("topk", "bottomk", "block", "random", "gsample", "shift_gsample")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(case: dict) -> dict:
    """One measurement, in this process (the child)."""
    from alchemist.selection import select

    n, retention = case["n"], case["retention"]
    base = _rss_mb()
    if case["kind"] == "select":
        scores = np.random.default_rng(0).standard_normal(n) if case["from_scores"] else None
        base = _rss_mb()
        tracemalloc.start()
        t0 = time.perf_counter()
        idx = select(n if scores is None else scores, case["strategy"], retention, seed=0)
        seconds = time.perf_counter() - t0
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        return {"seconds": seconds, "kept": len(idx), "peak_mb": _peak_rss_mb() - base, "traced_mb": traced}

    if case["kind"] == "shards":
        from alchemist.rank_stream import prune_stream, ratings_files

        t0 = time.perf_counter()
        res = prune_stream(ratings_files(case["path"]), case["strategy"], retention, seed=0, out=case["out"])
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "kept": res["kept"], "peak_mb": _peak_rss_mb() - base,
                "rows_per_s": n / seconds, "out_mb": os.path.getsize(case["out"]) / 2**20}

    from alchemist.ratings import read_ratings, write_table
    from alchemist.selection import prune_table

    t0 = time.perf_counter()
    ratings = read_ratings(case["path"])
    t1 = time.perf_counter()
    subset = prune_table(ratings, case["strategy"], retention, seed=0)
    t2 = time.perf_counter()
    write_table(subset, case["out"])
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "read_s": t1 - t0, "select_s": t2 - t1, "write_s": t3 - t2, "rows_per_s": n / (t3 - t0),
            "kept": len(subset), "peak_mb": _peak_rss_mb() - base,
            "in_mb": os.path.getsize(case["path"]) / 2**20, "out_mb": os.path.getsize(case["out"]) / 2**20}


def make_table(n: int, path: Path) -> float:
    """A synthetic ranked ratings parquet built in Arrow (seconds to build and write)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    ids = pc.utf8_lpad(pc.cast(pa.array(np.arange(n)), pa.string()), 9, "0")
    paths = pc.binary_join_element_wise("/data/laion/part-0042/", ids, ".jpg", "")
    words = pa.array(["a photo of a red car parked on a street", "two dogs playing in the snow",
                      "product shot of a white sneaker on a plain background",
                      "a crowded market with colourful stalls at dusk"])
    captions = pc.binary_join_element_wise(words.take(pa.array(rng.integers(0, 4, n))), ids, ", #")
    score = -np.sort(-rng.standard_normal(n))
    table = pa.table({"id": ids, "image_save_path": paths, "caption": captions,
                      "score": score, "rank": np.arange(n, dtype=np.int64)})
    pq.write_table(table, path)
    return time.perf_counter() - t0


def make_shards(n: int, root: Path) -> float:
    """The rows of ``make_table`` as per-shard ratings files in scoring's layout, unsorted (seconds)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for k, lo in enumerate(range(0, n, SHARD_ROWS)):
        hi = min(n, lo + SHARD_ROWS)
        ids = pc.utf8_lpad(pc.cast(pa.array(np.arange(lo, hi)), pa.string()), 9, "0")
        pq.write_table(pa.table({"row": np.arange(lo, hi), "id": ids, "score": rng.standard_normal(hi - lo),
                                 "skipped": pa.array([""] * (hi - lo))}), root / f"shard_{k:05d}.parquet")
    return time.perf_counter() - t0


def measure(case: dict) -> dict:
    """``run_case`` in a fresh process (the package's parent folder on its path, whatever the cwd)."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-m", "alchemist.bench.prune", json.dumps(case)],
                         capture_output=True, text=True, check=True, env=env)
    return {**case, **json.loads(out.stdout.strip().splitlines()[-1])}


def run_prune_benchmark(n: int, retentions: Sequence[float] = (0.2, 0.5), table: bool = False,
                        cases: Sequence[str] = ("select", "table", "shards"),
                        log: Callable[[str], None] = print) -> list[dict]:
    """Every strategy at every retention on N rank positions, shift_gsample also from unsorted scores,
    and (``table``) end-to-end pruning of an N-row parquet and of per-shard files; one result dict per
    case. ``cases`` picks among select, table and shards."""
    log(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, numpy {np.__version__}")
    results = []
    for r in (retentions if "select" in cases else ()):
        for strategy in STRATEGY_CASES:
            res = measure({"kind": "select", "n": n, "strategy": strategy, "retention": r, "from_scores": False})
            results.append(res)
            log(f"select   N={n:,} {strategy:14s} r={r:.2f}  {res['seconds']:6.2f} s  "
                f"peak +{res['peak_mb']:7.0f} MiB RSS, {res['traced_mb']:7.0f} MiB traced")
        res = measure({"kind": "select", "n": n, "strategy": "shift_gsample", "retention": r, "from_scores": True})
        results.append(res)
        log(f"select   N={n:,} {'shift_gsample':14s} r={r:.2f}  {res['seconds']:6.2f} s  "
            f"peak +{res['peak_mb']:7.0f} MiB RSS, {res['traced_mb']:7.0f} MiB traced  (from unsorted scores)")
    if table:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            path = Path(tmp) / "ratings.parquet"
            if "table" in cases:
                built = make_table(n, path)
                log(f"table    built {path.stat().st_size / 2**20:.0f} MiB parquet in {built:.1f} s")
            for r in (retentions if "table" in cases else ()):
                res = measure({"kind": "table", "n": n, "strategy": "shift_gsample", "retention": r,
                               "path": str(path), "out": str(Path(tmp) / "subset.parquet")})
                results.append(res)
                log(f"table    N={n:,} shift_gsample r={r:.2f}  {res['seconds']:6.2f} s "
                    f"({res['rows_per_s'] / 1e6:.2f} M rows/s; read {res['read_s']:.2f}, select {res['select_s']:.2f}, "
                    f"write {res['write_s']:.2f})  "
                    f"peak +{res['peak_mb']:7.0f} MiB RSS")
            shards = Path(tmp) / "ratings.parquet.shards"
            if "shards" in cases:
                built = make_shards(n, shards)
                log(f"shards   built {len(list(shards.iterdir()))} per-shard files in {built:.1f} s")
            for r in (retentions if "shards" in cases else ()):
                res = measure({"kind": "shards", "n": n, "strategy": "shift_gsample", "retention": r,
                               "path": str(shards), "out": str(Path(tmp) / "kept.parquet")})
                results.append(res)
                log(f"shards   N={n:,} shift_gsample r={r:.2f}  {res['seconds']:6.2f} s "
                    f"({res['rows_per_s'] / 1e6:.2f} M rows/s, streaming)  peak +{res['peak_mb']:7.0f} MiB RSS")
    return results


if __name__ == "__main__":  # the child of ``measure``
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
