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

The parts: experiment_arms.py (the arms, their rankings and subsets), experiment_runs.py (one training
run per arm and seed, and the pool that runs them) and experiment_report.py (the summary, the Markdown
section and the figure). This module puts them together; the names tests and scripts use from it are
re-exported here.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from alchemist.config import ConfigError, T2IConfig, load_config
from alchemist.data.pairs import DataError, load_pairs
from alchemist.evaluation.experiment_arms import (choose_heuristics, composition, heuristic_ratings, plan_arms,
                                                  planted_quality, rule_ratings, subset_ids, write_subset)
from alchemist.evaluation.experiment_report import plot_loss_curves, render_markdown, summarise, write_doc_section
from alchemist.evaluation.experiment_runs import (Job, _run_all, _write_json, build_caches, check_run_dir,
                                                  reference_metrics, run_config, set_threads)
from alchemist.ratings import read_ratings
from alchemist.selection import n_select

# re-exported for the users of ``experiment.<name>`` (tests, scripts); unused here
from alchemist.evaluation.experiment_arms import HEURISTIC_CANDIDATES  # noqa: F401
from alchemist.evaluation.experiment_report import DEFECT_KINDS, SECTION_END, SECTION_START, mean_std  # noqa: F401

# set per run by the experiment; an override of these would be silently replaced, so it is refused
RUN_KEYS = ("data.train_csv_path", "data.val_csv_path", "data.cache_dir", "output.local_out_dir_path",
            "output.exp_name", "output.resume", "optim.ep", "seed")
QUICK = {"epochs": 1, "n_generate": 8, "classifier_epochs": 1, "classifier_extra": 0}
QUICK_T2I = {"model.depth": 1}


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ExperimentConfig:
    demo: str = "runs/demo"  # data/, tokenizer.pt (via the T2I config) and ratings.parquet
    out: str = ""  # "" = <demo>/experiment (quick: <demo>/experiment_quick)
    ratings: str = ""  # "" = <demo>/ratings.parquet
    rules_dir: str = ""  # "" = <demo>/rules when it exists: <rule>/ratings.parquet per update rule
    t2i_config: str = "configs/demo_t2i.json"
    t2i_overrides: tuple[str, ...] = ()  # --key=value for the T2I config (not the RUN_KEYS)
    epochs: int = 8  # the same for every arm (8: 7 arms x 2 seeds in about an hour on 2 CPU cores); 0 = optim.ep
    seeds: tuple[int, ...] = (0, 1)
    heuristics: str = "auroc"  # auroc: the one heuristic with the best planted-defect AUROC; all: all three
    rule_arms: tuple[str, ...] = ()  # also Shift-Gsample 50 % on these rules' ratings (<rules_dir>/<rule>)
    n_generate: int = 200  # val captions to generate for (GenEval-lite, FID-lite); 0 = no generation
    classifier_epochs: int = 12
    classifier_extra: int = 10000  # freshly rendered clean scenes added to the classifier's training set
    cache: bool = True  # encode each subset once into a feature cache instead of every epoch
    jobs: int = 1  # runs trained in parallel (spawned processes)
    threads: int = 1  # torch threads per process; 0 = leave torch's default
    doc: str = "docs/results.md"  # "" = <out>/results.md; the section between the markers is replaced
    figure: str = ""  # "" = <doc folder>/figures/selection_loss.png (quick: beside the doc)
    quick: bool = False

    def __post_init__(self):
        if self.heuristics not in ("auroc", "all"):
            raise ConfigError(f"heuristics must be 'auroc' or 'all', got {self.heuristics!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        if self.epochs < 0 or self.n_generate < 0 or self.jobs < 1 or self.threads < 0:
            raise ConfigError("epochs, n_generate and threads must be >= 0 and jobs >= 1")
        if self.n_generate == 1:
            raise ConfigError("n_generate must be 0 (no generation) or >= 2 (FID-lite needs two images)")

    @property
    def demo_dir(self) -> Path:
        return Path(self.demo)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else self.demo_dir / ("experiment_quick" if self.quick else "experiment")

    @property
    def doc_path(self) -> Path:
        return Path(self.doc) if self.doc else self.out_dir / "results.md"

    @property
    def figure_path(self) -> Path:
        if self.figure:
            return Path(self.figure)
        return self.doc_path.parent / ("selection_loss.png" if self.quick else "figures/selection_loss.png")


def quick_config(**kw) -> ExperimentConfig:
    """``--quick``: 1 epoch, depth 1, 8 generated images, a 1-epoch classifier on the demo rows alone;
    the doc goes into the experiment folder unless one is named."""
    kw = {"doc": "", **QUICK, **kw, "quick": True}
    over = tuple(f"--{k}={v}" for k, v in QUICK_T2I.items()) + tuple(kw.pop("t2i_overrides", ()))
    return ExperimentConfig(t2i_overrides=over, **kw)


# ----------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    base: T2IConfig  # the T2I config every run starts from
    epochs: int
    pairs: pd.DataFrame  # load_pairs(train.csv) restricted to the rated ids, in file order
    ratings: pd.DataFrame  # the rater's, rank order
    defects: pd.DataFrame  # train rows of defects.csv
    data_dir: Path


def base_t2i_config(cfg: ExperimentConfig) -> T2IConfig:
    """The T2I config every run derives from: the file, the demo's paths, then the user's overrides."""
    from alchemist.config import parse_overrides

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
                       (data / "defects.csv", "the demo data folder must come from alchemist.data.demo"),
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
    return Inputs(base, epochs, pairs, ratings, defects[defects["split"] == "train"].reset_index(drop=True), data)


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
                          "run scripts/compare_rules.py --rules ... first")
    arms = plan_arms(chosen, cfg.rule_arms)

    # subsets, checked before any training
    universe = inp.ratings["id"].astype(str)
    bs = inp.base.optim.bs
    subsets, comp = {}, {}
    for arm in arms:
        for seed in cfg.seeds:
            ids = subset_ids(arm, seed, rankings, universe)
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
    records = _run_all(jobs, cfg, progress)
    for r in records:
        r["composition"] = comp[(r["arm"], r["seed"])]

    results = summarise(cfg, inp, arms, records, quality, chosen, why, clf_stats, command,
                        time.perf_counter() - t_start)
    results["reference"] = reference_metrics(ev)
    _write_json(results, out / "results.json")
    plot_loss_curves(results, cfg.figure_path)
    write_doc_section(cfg.doc_path, render_markdown(results, cfg.figure_path, cfg.doc_path))
    return results


def attribute_classifier(cfg: ExperimentConfig, data_dir: Path) -> tuple[Path, dict]:
    """The GenEval-lite / FID-lite judge, trained once into <out>/attr_clf.pt (again only when its
    training settings change; every run's evaluation is then redone, since it records the file's hash)."""
    from alchemist.evaluation.attributes import train_attribute_classifier

    path, meta_path = cfg.out_dir / "attr_clf.pt", cfg.out_dir / "attr_clf.json"
    want = {"epochs": cfg.classifier_epochs, "n_extra": cfg.classifier_extra}
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == want:
        return path, torch.load(path, map_location="cpu", weights_only=True).get("stats")
    stats = train_attribute_classifier(data_dir, path, epochs=cfg.classifier_epochs, n_extra=cfg.classifier_extra)
    _write_json(want, meta_path)
    return path, stats


def _file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]
