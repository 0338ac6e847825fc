"""Rows/s and peak memory of scoring N synthetic pairs with each engine (``scripts/bench.py score``).

The pairs are JPEGs with captions of random words in webdataset shards (the input the Ray engine is
for), the rater, tokenizer and text encoder tiny and random (``GEOMETRY``): the numbers are the
engines' own costs (reading, decoding, batching, writing, for Ray its cluster and actors), not a
model's. Each engine runs ``infer_rater.py`` end to end in a fresh process tree; its peak memory is
the largest sum of RSS over that tree (driver, Ray's raylet/GCS/workers, DataLoader workers), sampled
every 0.1 s. Two sizes give the fixed cost (start-up: imports, Ray, actors, model load) and the
per-row rate apart: wall = fixed + N / rate.
"""
from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from alchemist.bench.synthetic import TextSpec

# models small enough that the engines' overheads show: 16 px, 3 scales, 1 block; the tokenizer at
# VAR's narrowest width (32), one residual block a level
GEOMETRY = {"depth": 1, "raterDepth": 1, "image_size": 16, "patch_size": 4, "patch_nums": "1,2,4", "vocab_size": 32,
            "Cvae": 8, "vae_ch": 32, "vae_ch_mult": "1,1,1", "text_max_len": 16, "fp16": 0}
TEXT = TextSpec(width=32, layers=1, heads=2, ffn=64, vocab=256)
SHARD_ROWS = 1000


def write_inputs(n: int, root: Path, seed: int = 0) -> tuple[str, Path, list[str]]:
    """N pairs as ``root/shards/NNNNN.tar`` (``SHARD_ROWS`` a shard), a random tokenizer and text encoder and
    a random rater checkpoint: (shard glob, checkpoint, overrides pointing the config at the models)."""
    import torch
    from PIL import Image

    from alchemist.bench.synthetic import caption_words, random_tokenizer, write_random_text_encoder
    from alchemist.build import build_rater, build_text_encoder
    from alchemist.config import RaterConfig, config_to_dict, load_config

    root.mkdir(parents=True, exist_ok=True)
    write_random_text_encoder(root / "text_encoder", TEXT, GEOMETRY["text_max_len"], seed)
    over = {**GEOMETRY, "ckpt_path": str(root), "vae_ckpt": "tokenizer.pt", "text_enc_path": str(root / "text_encoder"),
            "check_images": False}
    cfg = load_config(RaterConfig, None, over)
    torch.manual_seed(seed)
    m = cfg.model
    vq = random_tokenizer(m, "cpu", num_res_blocks=1)
    kw = {"vocab_size": m.vocab_size, "z_channels": m.Cvae, "ch": m.vae_ch, "ch_mult": list(m.vae_ch_mult),
          "patch_nums": list(m.patch_nums), "num_res_blocks": 1}
    torch.save({"state_dict": vq.state_dict(), "config": kw}, root / "tokenizer.pt")
    rater = build_rater(m, build_text_encoder(m, "cpu").width, torch.device("cpu"))
    ckpt = root / "run/checkpoints/step_00000001.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"rater": rater.state_dict(), "config": config_to_dict(cfg), "step": 1}, ckpt)

    rng, words = np.random.default_rng(seed), caption_words(TEXT)
    size = GEOMETRY["image_size"] * 2  # decoded and resized, as real images are
    (root / "shards").mkdir(exist_ok=True)
    for k, lo in enumerate(range(0, n, SHARD_ROWS)):
        with tarfile.open(root / f"shards/{k:05d}.tar", "w") as tf:
            for i in range(lo, min(n, lo + SHARD_ROWS)):
                buf = io.BytesIO()
                low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
                caption = " ".join(rng.choice(words, rng.integers(4, 14))).encode()
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption)):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(root / "shards/*.tar"), ckpt, [f"--{k}={v}" for k, v in over.items() if k not in GEOMETRY]


def _tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def measure(engine: str, spec: str, ckpt: Path, overrides: Sequence[str], out: Path, bs: int, workers: int) -> dict:
    """One ``infer_rater.py`` run in a fresh process tree: wall seconds and peak summed RSS."""
    root = str(Path(__file__).resolve().parents[2])
    cmd = [sys.executable, os.path.join(root, "infer_rater.py"), "--engine", engine, "--ckpt", str(ckpt),
           "--csv", spec, "--out", str(out), "--bs", str(bs), "--num-workers", str(workers), "--no-progress",
           *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("RAY_ADDRESS", None)  # a local cluster of this machine, started and ended by the run
    t0, peak = time.perf_counter(), 0.0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        peak = max(peak, _tree_rss_mb(proc.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{engine} engine failed ({proc.returncode}): {stderr[-2000:]}")
    rated = int(stdout.split("rated ", 1)[1].split(" ", 1)[0])
    return {"engine": engine, "seconds": seconds, "rated": rated, "peak_rss_mb": peak}


def run_scoring_benchmark(sizes: Sequence[int], engines: Sequence[str] = ("torch", "ray"), bs: int = 256,
                          workers: int = 1, log: Callable[[str], None] = print) -> list[dict]:
    """Each engine at each size (fresh outputs each time); the fixed cost and rate from the two largest."""
    import torch

    log(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, torch {torch.__version__}; tiny rater {GEOMETRY}")
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for n in sizes:
            t0 = time.perf_counter()
            spec, ckpt, over = write_inputs(n, Path(tmp) / f"n{n}")
            log(f"inputs   N={n:,}: {-(-n // SHARD_ROWS)} shards written in {time.perf_counter() - t0:.1f} s")
            for engine in engines:
                res = {"n": n, **measure(engine, spec, ckpt, over, Path(tmp) / f"n{n}/{engine}.parquet", bs, workers)}
                res["rows_per_s"] = n / res["seconds"]
                results.append(res)
                log(f"{engine:6s}   N={n:,}  {res['seconds']:7.1f} s  {res['rows_per_s']:7.0f} rows/s end to end  "
                    f"peak {res['peak_rss_mb']:6.0f} MiB RSS (process tree)")
    if len(sizes) >= 2:
        a, b = sorted(sizes)[-2:]
        for engine in engines:
            ta, tb = (next(r["seconds"] for r in results if r["n"] == n and r["engine"] == engine) for n in (a, b))
            rate = (b - a) / (tb - ta) if tb > ta else float("inf")
            fixed = ta - a / rate
            results.append({"engine": engine, "fit": [a, b], "rows_per_s_steady": rate, "fixed_s": fixed})
            log(f"{engine:6s}   steady {rate:7.0f} rows/s, fixed {fixed:5.1f} s  (from N={a:,} and N={b:,}); "
                f"1 M rows ≈ {(fixed + 1e6 / rate) / 60:.0f} min on this machine")
    return results


def main_json(results: list[dict], path: str) -> None:
    from alchemist.utils.io import atomic_open

    with atomic_open(path) as f:
        json.dump(results, f, indent=1)
