"""The demo pipeline on generated data, on a CPU, in minutes (``make demo``; ``scripts/demo.py``).

``run_demo``: 1 demo dataset -> 2 tokenizer -> 3 rater (bilevel) -> 4 scores -> 5 Shift-Gsample 50 %
subset -> 6 pictures -> 7 where each planted kind landed. ``run_generation``: the same first two
stages, then a T2I model (configs/demo_t2i.json) and a grid of its samples. Every stage reuses its
output when it is already there (the models resume from their last checkpoint), so a rerun continues
where it stopped. Outputs go under ``out`` (runs/demo by default).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from alchemist.bilevel.distill import TARGET_FILE
from alchemist.bilevel.launch import train_rater
from alchemist.config import RaterConfig, T2IConfig, load_config
from alchemist.evaluation.samples import sample_grid
from alchemist.evaluation.train import train_t2i
from alchemist.plots import plot_rank_bands, plot_selection
from alchemist.ratings import read_ratings, write_ratings
from alchemist.scoring import rate_file, shards_dir
from alchemist.selection import junk_ceiling, junk_share, prune_table, resolve_params
from alchemist.target_blend import TARGET_WEIGHT, blend_with_target
from alchemist.tokenizer_training import train_tokenizer_for, use_bundled_tokenizer
from alchemist.utils.checkpoint import latest_checkpoint
from alchemist.utils.errors import UserError
from experiments.demo_data import DemoSpec, format_summary, generate_demo
from experiments.digits_data import DigitsSpec, generate_digits
from experiments.planted import format_kind_report, kind_report
from experiments.types import BENCHMARKS


def stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def done(t: float) -> None:
    print(f"({time.perf_counter() - t:.1f}s)", flush=True)


def demo_dataset(out: Path, n_train: int, n_val: int, seed: int, bench: str = "demo") -> Path:
    """Stage 1: the benchmark's dataset under <out>/data (reused when the same spec is already there):
    ``demo`` the generated scenes, ``digits`` the real digit scans (its own fixed size)."""
    data = out / "data"
    if bench == "digits":
        counts = generate_digits(data, DigitsSpec(seed=seed))
        print(f"digits data in {data} (seed {seed}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    elif bench == "demo":
        print(format_summary(generate_demo(data, DemoSpec(n_train=n_train, n_val=n_val, seed=seed))))
    else:
        raise UserError(f"unknown benchmark {bench!r}; choose one of {', '.join(BENCHMARKS)}")
    return data


def demo_config(cls: type, config: str, out: Path, seed: int, overrides: Sequence[str] = ()):
    """A demo config (rater or T2I) pointed at <out>'s data, tokenizer and run folders, then ``overrides``."""
    data = out / "data"
    paths = {"train_csv_path": data / "train.csv", "val_csv_path": data / "val.csv", "ckpt_path": out,
             "local_out_dir_path": out, "seed": seed}
    return load_config(cls, config, [f"--{k}={v}" for k, v in paths.items()] + list(overrides))


def run_demo(out: str | Path = "runs/demo", n_train: int = 2000, n_val: int = 500, seed: int = 0,
             tokenizer_steps: int = 800, retention: float = 0.5, overrides: Sequence[str] = (),
             config: str = "configs/demo_rater.json", bench: str = "demo", threads: int = 1,
             tokenizer: str | Path = "") -> pd.DataFrame:
    """Every stage of the method on a benchmark's data; returns the ratings. ``overrides`` (--key=value)
    go to the rater config, e.g. --estimator=lookahead --ep=3. ``threads``: torch's intra-op threads,
    fixed because the float sums, and so every number downstream, depend on the thread count.
    ``tokenizer``: a bundled finished tokenizer (``bundle_tokenizer``), used instead of training one when
    it was trained for ``tokenizer_steps`` on exactly this run's training images."""
    torch.set_num_threads(threads)
    out = Path(out)
    t = stage(f"1. {bench} dataset")
    data = demo_dataset(out, n_train, n_val, seed, bench)
    done(t)

    cfg = demo_config(RaterConfig, config, out, seed, overrides)

    t = stage("2. tokenizer")
    if tokenizer and use_bundled_tokenizer(tokenizer, cfg.data.train_csv_path, out / "tokenizer.pt", tokenizer_steps):
        print(f"the bundled {tokenizer} was trained on these images: using it")
    elif tokenizer and not (out / "tokenizer.pt").exists():
        print(f"the bundled {tokenizer} was trained on other images or for other steps: training one")
    # the demo's own tokenizer (no pretrained VQ weights exist offline); resumes a killed run, reuses a finished one
    stats = train_tokenizer_for(cfg.model, cfg.data.train_csv_path, out / "tokenizer.pt", tokenizer_steps, cfg.seed,
                                cfg.data.num_workers)
    print(f"tokenizer: recon MSE {stats['recon_mse']:.4f}, codebook usage {stats['usage']:.0%}, "
          f"perplexity {stats['perplexity']:.0f} -> {out / 'tokenizer.pt'}")
    done(t)

    t = stage(f"3. rater: bilevel training, rule '{cfg.bilevel.estimator}'")
    summary = train_rater(cfg)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items() if not k.startswith("L_val_s")})
    done(t)

    t = stage("4. scoring the training set and the validation set (the trusted reference)")
    ratings_path = rated(cfg.output.run_dir, data / "train.csv", out / "ratings.parquet", out)
    ratings = pipeline_ratings(out, cfg.output.exp_name)
    if "rater_score" in ratings:  # the file holds the ranking everything after this stage reads
        print("ranked by the rater and its distillation target together (alchemist/target_blend.py)")
        write_ratings(ratings, ratings_path)
    reference = reference_scores(out, cfg.output.exp_name)
    done(t)

    t = stage(f"5. Shift-Gsample {retention:.0%} subset")
    subset = prune_table(ratings, "shift_gsample", retention, seed=seed, keep_scores=True, reference=reference)
    write_ratings(subset, out / "subset_ratings.parquet")
    subset.drop(columns=["score", "rank"]).to_csv(out / "subset.csv", index=False)
    scores = ratings["score"].to_numpy()
    used = resolve_params("shift_gsample", len(ratings), retention, scores, reference)
    print(f"junk share against the {len(reference)} validation pairs: estimate {junk_share(scores, reference):.1%}, "
          f"ceiling {junk_ceiling(scores, reference):.1%}; " + ", ".join(f"{p} {v:.3f}" for p, v in used.items()))
    print(f"kept {len(subset)} of {len(ratings)} pairs -> {out / 'subset.csv'}")
    done(t)

    t = stage("6. pictures")
    print(plot_selection(ratings, "shift_gsample", retention, out / "selection.png", seed=seed, reference=reference))
    print(plot_rank_bands(ratings, out / "rank_bands.png", seed=seed))
    done(t)

    stage("7. where the planted kinds landed (ground truth from defects.csv; never read in training)")
    defects = pd.read_csv(data / "defects.csv", dtype={"id": str})
    report = kind_report(ratings, defects[defects["split"] == "train"], selected_ids=subset["id"])
    print(format_kind_report(report))
    return ratings


def rated(run_dir: Path, table: Path, path: Path, out: Path) -> Path:
    """``table`` scored by the rater in ``run_dir`` into ``path``, reused unless the rater changed since
    (e.g. a rerun added the distillation stage)."""
    if path.exists() and path.stat().st_mtime >= latest_checkpoint(run_dir).stat().st_mtime:
        print(f"reusing {path}")
    else:
        path.unlink(missing_ok=True)
        shutil.rmtree(shards_dir(path), ignore_errors=True)
        rate_file(run_dir, table, path, overrides=[f"--ckpt_path={out}"])
    return path


def pipeline_ratings(out: Path, exp_name: str = "rater", weight: float = TARGET_WEIGHT) -> pd.DataFrame:
    """A run folder's ratings of its training pairs as the pipeline ranks them: blended with the rater
    run's distillation target when it has one (as stage 4 writes them; a folder of an older run gets
    the same ranking)."""
    out = Path(out)
    ratings = read_ratings(out / "ratings.parquet")
    target = out / exp_name / TARGET_FILE
    if not target.is_file():
        return ratings
    return blend_with_target(ratings, pd.read_parquet(target, columns=["id", "target"]), weight)


def reference_scores(out: Path, exp_name: str = "rater") -> np.ndarray:
    """The rater's scores of a run folder's validation pairs (scored into <out>/val_ratings.parquet
    when missing or older than the rater): Shift-Gsample's reference of trusted pairs."""
    out = Path(out)
    return read_ratings(rated(out / exp_name, out / "data/val.csv", out / "val_ratings.parquet", out))["score"].to_numpy()


def run_generation(out: str | Path = "runs/demo", n_train: int = 2000, n_val: int = 500, seed: int = 0,
                   tokenizer_steps: int = 800, grid: str | Path = "", rows: int = 8, samples: int = 4,
                   overrides: Sequence[str] = (), config: str = "configs/demo_t2i.json") -> Path:
    """Does the proxy architecture learn to draw what captions ask for? 1 demo dataset -> 2 tokenizer
    (shared with ``run_demo``) -> 3 T2I model (run folder <out>/t2i, resumable) -> 4 a PNG grid of
    samples for val captions beside the real images. ``overrides`` go to the T2I config."""
    out = Path(out)
    t = time.perf_counter()
    print("=== 1. demo dataset", flush=True)
    demo_dataset(out, n_train, n_val, seed)
    cfg = demo_config(T2IConfig, config, out, seed, overrides)

    print("=== 2. tokenizer", flush=True)
    tok = out / "tokenizer.pt"  # a killed run resumes, a finished one is reused
    stats = train_tokenizer_for(cfg.model, cfg.data.train_csv_path, tok, tokenizer_steps, seed, cfg.data.num_workers)
    print(f"tokenizer: recon MSE {stats['recon_mse']:.4f}, codebook usage {stats['usage']:.0%} -> {tok}")

    print(f"=== 3. T2I model: depth {cfg.model.depth}, {cfg.optim.ep} epochs -> {cfg.output.run_dir}", flush=True)
    summary = train_t2i(cfg)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})

    print("=== 4. samples", flush=True)
    path = sample_grid(cfg.output.run_dir, cfg.data.val_csv_path, grid or out / "samples.png", n=rows, k=samples,
                       seed=seed)
    print(f"wrote {path} ({time.perf_counter() - t:.0f}s in all)")
    return path
