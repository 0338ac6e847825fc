"""The downstream test at equal training steps: full data vs random 50 % vs Shift-Gsample 50 % vs
Top-K 50 %, on every seed of a sweep (``experiments.sweep``: each seed folder holds its dataset,
tokenizer and ratings), so each seed is a whole pipeline: its own data draw, tokenizer, rater, subsets
and downstream models.

Equal steps: a 50 % arm trains twice the epochs of the full arm (within one batch per epoch of the
same step count; the steps are reported). Measures on the seed's clean validation set:
- ``heldout_loss``: mean token cross-entropy (nats) with the true captions;
- ``caption_gain``: held-out loss with each caption moved to another image, minus ``heldout_loss``:
  how much of the caption the model uses (caption faithfulness; 0 = captions ignored).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from alchemist.config import T2IConfig
from alchemist.data.pairs import load_pairs
from alchemist.data.tokens import Featurizer
from alchemist.evaluation.metrics import heldout_token_loss
from alchemist.evaluation.samples import load_t2i_run
from alchemist.evaluation.train import train_t2i
from alchemist.ratings import read_ratings
from alchemist.runtime import make_stream, setup_runtime
from alchemist.selection import prune_table
from alchemist.utils.io import atomic_open
from experiments.demo import demo_config, pipeline_ratings, reference_scores
from experiments.types import KINDS

ARMS = {"full": ("all", 1.0), "random_50": ("random", 0.5), "shift_gsample_50": ("shift_gsample", 0.5),
        "topk_50": ("topk", 0.5)}


def subset_table(seed_dir: Path, arm: str, seed: int) -> pd.DataFrame:
    """The arm's training rows (the seed's own ratings; sampled arms use the seed). Selection works on
    rank positions and the ratings file is in rank order, so the full and random arms take the rows in
    id order, as if ranked by id: their rows, and the order the loader shuffles them from, do not
    depend on the rater (a re-rated seed keeps its random and full runs)."""
    strategy, retention = ARMS[arm]
    ratings = pipeline_ratings(seed_dir)
    if strategy in ("all", "random"):
        ratings = ratings.sort_values("id", kind="stable").reset_index(drop=True)
        ratings["rank"] = np.arange(len(ratings))
    if strategy == "all":
        return ratings.drop(columns=["score", "rank", "official_score", "rater_score"], errors="ignore")
    reference = reference_scores(seed_dir) if strategy == "shift_gsample" else None
    return prune_table(ratings, strategy, retention, seed=seed, reference=reference).drop(
        columns=["official_score", "rater_score"], errors="ignore")


@torch.no_grad()
def caption_shuffled_loss(run_dir: Path, val_csv: Path) -> float:
    """Held-out loss when every validation caption is moved to the next image (a derangement)."""
    _, cfg, proxy, vqvae, text = load_t2i_run(run_dir)
    table = load_pairs(val_csv, cfg.data)
    table = table.assign(caption=np.roll(table["caption"].to_numpy(), 1))
    rt = setup_runtime(cfg.optim.bs, 0)
    val = make_stream(table, cfg.data, "val", rt, shuffle=False, drop_last=False, caption_dropout=0.0, seed=0)
    return heldout_token_loss(proxy, Featurizer(vqvae, text, rt.device), val.make_loader(val.sampler))


def run_arm(seed_dir: str, arm: str, seed: int, epochs_full: int, overrides: Sequence[str], config: str,
            threads: int = 1) -> dict:
    """Train (or reuse) one arm's downstream model for one seed; its measures."""
    torch.set_num_threads(threads)
    d = Path(seed_dir)
    out = d / "downstream" / arm
    out.mkdir(parents=True, exist_ok=True)
    subset = subset_table(d, arm, seed)
    if (out / "subset.csv").exists() and not pd.read_csv(out / "subset.csv", dtype={"id": str})["id"].equals(
            subset["id"].astype(str).reset_index(drop=True)):  # trained on other rows (e.g. a re-rated seed)
        shutil.rmtree(out)
        out.mkdir(parents=True)
    with atomic_open(out / "subset.csv") as f:
        subset.to_csv(f, index=False)
    epochs = epochs_full * round(1 / ARMS[arm][1])
    cfg = demo_config(T2IConfig, config, d, seed, [*overrides, f"--train_csv_path={out / 'subset.csv'}",
                                                   f"--local_out_dir_path={d / 'downstream'}", f"--exp_name={arm}",
                                                   f"--ep={epochs}", "--progress=false"])
    summary_path = out / "summary.json"  # a finished run on the same rows is reused
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else train_t2i(cfg)
    shuffled = caption_shuffled_loss(cfg.output.run_dir, Path(cfg.data.val_csv_path))
    defects = pd.read_csv(d / "data/defects.csv", dtype={"id": str}, keep_default_na=False).set_index("id")["kind"]
    kinds = subset["id"].astype(str).map(defects).value_counts(normalize=True)
    return {"seed": seed, "arm": arm, "steps": summary["steps"], "rows": len(subset),
            "heldout_loss": summary["heldout_loss"], "caption_gain": shuffled - summary["heldout_loss"],
            **{f"share_{k}": float(kinds.get(k, 0.0)) for k in KINDS}}


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    g = runs.groupby("arm", sort=False)
    return pd.DataFrame({"steps": g["steps"].mean(), "heldout_mean": g["heldout_loss"].mean(),
                         "heldout_std": g["heldout_loss"].std(ddof=1), "gain_mean": g["caption_gain"].mean(),
                         "gain_std": g["caption_gain"].std(ddof=1), "junk_share": 1 - g["share_clean"].mean(),
                         "seeds": g.size()})


def format_table(bench: str, table: pd.DataFrame, runs: pd.DataFrame) -> str:
    lines = [f"{bench}: {int(table['seeds'].max())} seeds, equal steps; mean ± std over seeds", "",
             "| arm | steps | held-out loss | caption gain | non-clean share | held-out loss per seed |",
             "|---|---|---|---|---|---|"]
    for arm, r in table.iterrows():
        each = ", ".join(f"{v:.3f}" for v in runs[runs["arm"] == arm].sort_values("seed")["heldout_loss"])
        lines.append(f"| {arm} | {r.steps:.0f} | {r.heldout_mean:.3f} ± {r.heldout_std:.3f} | "
                     f"{r.gain_mean:.3f} ± {r.gain_std:.3f} | {r.junk_share:.1%} | {each} |")
    return "\n".join(lines)


def run_downstream(sweep_dir: str | Path, bench: str, seeds: Sequence[int], epochs_full: int = 2, jobs: int = 2,
                   overrides: Sequence[str] = (), config: str = "configs/demo_t2i.json") -> pd.DataFrame:
    """Every arm × seed (``jobs`` processes at once), then <sweep_dir>/downstream.{json,md}."""
    sweep_dir = Path(sweep_dir)
    tasks = [(str(sweep_dir / f"seed{s}"), arm, s, epochs_full, tuple(overrides), config) for s in seeds for arm in ARMS]
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(run_arm, *zip(*tasks)))
    runs = pd.DataFrame(results)
    table = summarize(runs)
    text = format_table(bench, table, runs)
    with atomic_open(sweep_dir / "downstream.md") as f:
        f.write(text + "\n")
    with atomic_open(sweep_dir / "downstream.json") as f:
        json.dump({"bench": bench, "seeds": list(seeds), "epochs_full": epochs_full, "overrides": list(overrides),
                   "runs": results}, f, indent=2)
    print(text)
    return table
