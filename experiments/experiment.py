"""The selection experiment: does a T2I model trained on the Alchemist-selected subset beat one
trained on random data of the same size, and match one trained on all of it (docs/method.md §1, §6)?

From one demo dataset and one rater's ratings, every *arm* picks a subset of the training pairs:

  full                 all rated pairs
  random_50            50 % uniformly at random                 (selection seed = run seed)
  shift_gsample_50     50 % by Shift-Gsample on the rater's rank (selection seed = run seed)
  topk_50              the rater's best 50 %
  <heuristic>_50       the best 50 % by an image statistic (clarity, lowfreq, edge_density)
  random_20, shift_gsample_20

and a downstream model (``train_t2i``, configs/demo_t2i.json) is trained on it for the same
number of epochs in every arm (so a 50 % subset gets half the steps of full data), once per seed;
the training seed is the run seed too. Each run is measured by its held-out token loss after every
epoch, and by GenEval-lite and FID-lite on images generated for the first N clean val captions,
judged by an attribute classifier trained once. Planted-defect AUROCs and rank-decile tables say
how good each ranking is without any training. Results go to ``results.json`` and a Markdown
section with a loss-curve figure (by default in docs/results.md).

Everything is cached under the experiment folder and a rerun continues: heuristic ratings, the
classifier, the subsets (a rerun checks they are unchanged), the feature caches, every run (a run
with a finished ``summary.json`` is not retrained; an unfinished one resumes from its checkpoint)
and every run's evaluation (``eval.json``).

The parts: types.py (the configuration, arms and inputs), arms.py (the arms' rankings and subsets),
runs.py (one training run per arm and seed, and the pool that runs them) and report.py (the summary,
the Markdown section and the figure). This module puts them together.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from alchemist.config import ConfigError, T2IConfig, load_config, parse_overrides
from alchemist.data.pairs import DataError, load_pairs
from alchemist.ratings import read_ratings
from alchemist.selection import n_select
from alchemist.utils.io import write_json
from experiments.arms import (choose_heuristics, composition, heuristic_ratings, plan_arms, planted_quality,
                              rule_ratings, subset_ids, write_subset)
from experiments.attributes import train_attribute_classifier
from experiments.report import plot_loss_curves, render_markdown, summarise, write_doc_section
from experiments.runs import Job, build_caches, check_run_dir, reference_metrics, run_all, run_config, set_threads
from experiments.types import RUN_KEYS, ExperimentConfig, Inputs


# ----------------------------------------------------------------------------- inputs
def base_t2i_config(cfg: ExperimentConfig) -> T2IConfig:
    """The T2I config every run derives from: the file, the demo's paths, then the user's overrides."""
    user = parse_overrides(T2IConfig, list(cfg.t2i_overrides))
    fixed = sorted(set(user) & set(RUN_KEYS))
    if fixed:
        raise ConfigError(f"--{fixed[0]} is set by the experiment for every run; use --epochs, --seeds or --demo "
                          "instead")
    data = cfg.demo_dir / "data"
    values = {"data.train_csv_path": str(data / "train.csv"), "data.val_csv_path": str(data / "val.csv"),
              "model.ckpt_path": str(cfg.demo_dir), "output.local_out_dir_path": str(cfg.out_dir / "runs"),
              "output.resume": "auto", **user}
    return load_config(T2IConfig, cfg.t2i_config, values)


def load_inputs(cfg: ExperimentConfig) -> Inputs:
    data = cfg.demo_dir / "data"
    ratings_path = Path(cfg.ratings) if cfg.ratings else cfg.demo_dir / "ratings.parquet"
    for need, hint in ((data / "train.csv", "run `make demo` (scripts/demo.py --out DEMO) first"),
                       (data / "defects.csv", "the demo data folder must come from experiments.demo_data"),
                       (ratings_path, "score the training set with the rater first (scripts/demo.py does)")):
        if not need.is_file():
            raise FileNotFoundError(f"{str(need)!r} does not exist; {hint}")
    base = base_t2i_config(cfg)
    epochs = cfg.epochs or base.optim.ep
    ratings = read_ratings(ratings_path)
    pairs = load_pairs(data / "train.csv", base.data)
    stray = pd.Index(ratings["id"].astype(str)).difference(pairs["id"])
    if len(stray):
        raise DataError(f"{len(stray)} rated ids are not usable rows of {data / 'train.csv'} (first: {stray[0]!r}); "
                        "the ratings must come from this demo's training set")
    rated = set(ratings["id"].astype(str))
    pairs = pairs[pairs["id"].isin(rated)].reset_index(drop=True)
    defects = pd.read_csv(data / "defects.csv", dtype=str, keep_default_na=False)
    return Inputs(base, epochs, pairs, ratings, defects[defects["split"] == "train"].reset_index(drop=True), data,
                  trusted_reference(cfg, ratings_path))


def trusted_reference(cfg: ExperimentConfig, ratings_path: Path) -> np.ndarray | None:
    """Shift-Gsample's reference: the same rater's scores of the validation pairs (``--reference``, or
    the one ``run_demo`` writes beside its ratings). Without one the arms fall back to the tail 0.15,
    and say so; the demo's file older than its ratings may be another rater's, so it is refused."""
    ref_path = Path(cfg.reference) if cfg.reference else cfg.demo_dir / "val_ratings.parquet"
    if cfg.reference and not ref_path.is_file():
        raise FileNotFoundError(f"--reference {str(ref_path)!r} does not exist")
    if not cfg.reference and (cfg.ratings or not ref_path.is_file()):  # the demo's file would be another rater's
        print(f"no reference for {ratings_path}: the Shift-Gsample arms use the tail 0.15 (docs/selection.md); "
              "score data/val.csv with the same rater (infer_rater.py) and pass it as --reference")
        return None
    if not cfg.reference and ref_path.stat().st_mtime < ratings_path.stat().st_mtime:
        raise DataError(f"{ref_path} is older than {ratings_path}, so it may be another rater's scores; rerun "
                        "scripts/demo.py (it rescores both) or pass the rater's validation scores as --reference")
    return read_ratings(ref_path)["score"].to_numpy()


# ----------------------------------------------------------------------------- the experiment
def run_experiment(cfg: ExperimentConfig, command: str = "", progress: bool = True) -> dict:
    """Everything: rankings, subsets, caches, classifier, runs, results.json, the figure and the doc section.
    Returns the results dict (also written to <out>/results.json)."""
    t_start = time.perf_counter()
    set_threads(cfg.threads)
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    inp = load_inputs(cfg)

    # rankings and how they place the planted defects
    heur = heuristic_ratings(cfg, inp, progress=progress)
    rules = rule_ratings(cfg)
    rankings = {"rater": inp.ratings, **{f"rule:{k}": v for k, v in rules.items()}, **heur}
    quality = planted_quality(rankings, inp.defects)
    chosen, why = choose_heuristics(cfg, quality)
    missing = [r for r in cfg.rule_arms if r not in rules]
    if missing:
        raise ConfigError(f"rule arm(s) {missing} have no <rules_dir>/<rule>/ratings.parquet (found: {sorted(rules)}); "
                          "run scripts/experiment.py rules --rules ... first")
    arms = plan_arms(chosen, cfg.rule_arms)

    # subsets, checked before any training
    universe = inp.ratings["id"].astype(str)
    references = {"rater": inp.reference} if inp.reference is not None else {}
    bs = inp.base.optim.bs
    subsets, comp = {}, {}
    for arm in arms:
        for seed in cfg.seeds:
            ids = subset_ids(arm, seed, rankings, universe, references)
            want = n_select(len(universe), arm.retention) if arm.source != "all" else len(universe)
            if not len(ids) == want == len(set(ids)):
                raise RuntimeError(f"arm {arm.name} selected {len(ids)} rows ({len(set(ids))} distinct), not {want}")
            if len(ids) < bs:
                raise ConfigError(f"arm {arm.name} keeps {len(ids)} rows, fewer than optim.bs={bs}: no full batch "
                                  "to train on; lower --bs or use a larger demo")
            subsets[(arm.name, seed)] = write_subset(ids, inp.pairs, out / "subsets" / f"{arm.name}_s{seed}.csv")
            comp[(arm.name, seed)] = composition(ids, inp.defects)

    caches = build_caches(cfg, inp.base, subsets, progress) if cfg.cache else {}

    clf_path, clf_stats = attribute_classifier(cfg, inp.data_dir) if cfg.n_generate else (out / "attr_clf.pt", None)

    # runs: seed-major, so a partial experiment already has whole seeds
    ev = {"n_generate": cfg.n_generate, "classifier": str(clf_path), "data_dir": str(inp.data_dir),
          "classifier_sha1": _file_digest(clf_path) if cfg.n_generate else ""}
    jobs = []
    for seed in cfg.seeds:
        for arm in arms:
            run_cfg = run_config(inp.base, subsets[(arm.name, seed)], f"{arm.name}_s{seed}", inp.epochs, seed,
                                 caches.get((arm.name, seed)), progress=progress and cfg.jobs == 1)
            check_run_dir(run_cfg)
            jobs.append(Job(arm, seed, str(subsets[(arm.name, seed)]), run_cfg, ev))
    records = run_all(jobs, cfg, progress)
    for r in records:
        r["composition"] = comp[(r["arm"], r["seed"])]

    results = summarise(cfg, inp, arms, records, quality, chosen, why, clf_stats, command,
                        time.perf_counter() - t_start)
    results["reference"] = reference_metrics(ev)
    write_json(results, out / "results.json")
    plot_loss_curves(results, cfg.figure_path)
    write_doc_section(cfg.doc_path, render_markdown(results, cfg.figure_path, cfg.doc_path))
    return results


def attribute_classifier(cfg: ExperimentConfig, data_dir: Path) -> tuple[Path, dict]:
    """The GenEval-lite / FID-lite judge, trained once into <out>/attr_clf.pt (again only when its
    training settings change; every run's evaluation is then redone, since it records the file's hash)."""
    path, meta_path = cfg.out_dir / "attr_clf.pt", cfg.out_dir / "attr_clf.json"
    want = {"epochs": cfg.classifier_epochs, "n_extra": cfg.classifier_extra}
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == want:
        return path, torch.load(path, map_location="cpu", weights_only=True).get("stats")
    stats = train_attribute_classifier(data_dir, path, epochs=cfg.classifier_epochs, n_extra=cfg.classifier_extra)
    write_json(want, meta_path)
    return path, stats


def _file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]
