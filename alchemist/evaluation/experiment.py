"""The selection experiment: does a T2I model trained on the Alchemist-selected subset beat one
trained on random data of the same size, and match one trained on all of it (METHOD.md §1, §6)?

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
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as dt
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from alchemist.config import ConfigError, T2IConfig, config_to_dict, load_config
from alchemist.data.demo import KINDS
from alchemist.data.pairs import DataError, load_pairs
from alchemist.evaluation.planted import N_DECILES, kind_report
from alchemist.ratings import read_ratings, write_ratings
from alchemist.selection import n_select, prune_table
from alchemist.utils.io import atomic_open

HEURISTIC_CANDIDATES = ("clarity", "lowfreq", "edge_density")
SAMPLED = ("random", "shift_gsample", "gsample")  # strategies whose subset depends on the seed
DEFECT_KINDS = tuple(k for k in KINDS if k != "clean")
SECTION_START = "<!-- selection-experiment:start -->"
SECTION_END = "<!-- selection-experiment:end -->"
# set per run by the experiment; an override of these would be silently replaced, so it is refused
RUN_KEYS = ("data.train_csv_path", "data.val_csv_path", "data.cache_dir", "output.local_out_dir_path",
            "output.exp_name", "output.resume", "optim.ep", "seed")
QUICK = {"epochs": 1, "n_generate": 8, "classifier_epochs": 1, "classifier_extra": 0}
QUICK_T2I = {"model.depth": 1}


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Arm:
    name: str  # folder-safe id, e.g. "shift_gsample_50"
    source: str  # "all" (full data), "rater", or a heuristic name: whose ranking is used
    strategy: str  # selection strategy ("all" for full data)
    retention: float

    @property
    def sampled(self) -> bool:
        return self.strategy in SAMPLED

    @property
    def label(self) -> str:
        if self.source == "all":
            return "full data"
        what = {"random": "random", "shift_gsample": "Shift-Gsample", "topk": "Top-K", "gsample": "Gsample",
                "block": "block", "bottomk": "Bottom-K"}.get(self.strategy, self.strategy)
        if self.source not in ("rater", "all") and self.strategy == "topk":
            what = f"{self.source} (top)"
        return f"{what} {self.retention:.0%}"


def rater_arms() -> list[Arm]:
    """The arms that need no heuristic: full, random / Shift-Gsample / Top-K 50 %, random / Shift-Gsample 20 %."""
    return [Arm("full", "all", "all", 1.0),
            Arm("random_50", "rater", "random", 0.5),
            Arm("shift_gsample_50", "rater", "shift_gsample", 0.5),
            Arm("topk_50", "rater", "topk", 0.5),
            Arm("random_20", "rater", "random", 0.2),
            Arm("shift_gsample_20", "rater", "shift_gsample", 0.2)]


def heuristic_arm(name: str, retention: float = 0.5) -> Arm:
    return Arm(f"{name}_{round(retention * 100)}", name, "topk", retention)


@dataclass(frozen=True)
class ExperimentConfig:
    demo: str = "runs/demo"  # data/, tokenizer.pt (via the T2I config) and ratings.parquet
    out: str = ""  # "" = <demo>/experiment (quick: <demo>/experiment_quick)
    ratings: str = ""  # "" = <demo>/ratings.parquet
    rules_dir: str = ""  # "" = <demo>/rules when it exists: <rule>/ratings.parquet per update rule
    t2i_config: str = "configs/demo_t2i.json"
    t2i_overrides: tuple[str, ...] = ()  # --key=value for the T2I config (not the RUN_KEYS)
    epochs: int = 0  # 0 = the T2I config's optim.ep; the same for every arm
    seeds: tuple[int, ...] = (0, 1)
    heuristics: str = "auroc"  # auroc: the one heuristic with the best planted-defect AUROC; all: all three
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


# ----------------------------------------------------------------------------- small helpers
def _write_json(obj: Any, path: Path) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:12]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value); NaN when empty."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def set_threads(threads: int) -> None:
    """Tiny CPU models are per-op-overhead bound, and OpenMP threads that spin while another job holds
    the cores are slower still: 1 thread per process (and ``jobs`` processes) is the default."""
    if threads > 0:
        torch.set_num_threads(threads)


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


# ----------------------------------------------------------------------------- rankings
def heuristic_ratings(cfg: ExperimentConfig, inp: Inputs, names: Sequence[str] = HEURISTIC_CANDIDATES,
                      progress: bool = True) -> dict[str, pd.DataFrame]:
    """Ratings by each image statistic over the rated pairs, computed once into <out>/heuristics/."""
    from alchemist.heuristics import make_scorer, rate_pairs

    out = {}
    for name in names:
        path = cfg.out_dir / "heuristics" / f"{name}.parquet"
        if path.is_file():
            r = read_ratings(path)
            if set(r["id"]) == set(inp.pairs["id"]):
                out[name] = r
                continue
        r, skipped = rate_pairs(inp.pairs, name, make_scorer(name), image_size=inp.base.data.image_size, bs=256,
                                progress=progress)
        if skipped:
            raise DataError(f"{len(skipped)} images could not be read when scoring {name} (first: {skipped[0]})")
        write_ratings(r, path)
        out[name] = read_ratings(path)
    return out


def planted_quality(rankings: dict[str, pd.DataFrame], defects: pd.DataFrame) -> dict[str, dict]:
    """Per ranking: AUROC clean vs each planted kind, the mean over kinds, and the rank-decile table."""
    out = {}
    for name, r in rankings.items():
        rep = kind_report(r, defects)
        aurocs = {k: float(v) for k, v in rep["auroc"].items()}
        out[name] = {"n": {k: int(v) for k, v in rep["n"].items()}, "auroc": aurocs,
                     "mean_auroc": float(np.mean(list(aurocs.values()))) if aurocs else math.nan,
                     "deciles": {k: [float(x) for x in row] for k, row in rep["deciles"].iterrows()}}
    return out


def rule_ratings(cfg: ExperimentConfig) -> dict[str, pd.DataFrame]:
    """``<rules_dir>/<rule>/ratings.parquet`` written by scripts/compare_rules.py, one per update rule."""
    root = Path(cfg.rules_dir) if cfg.rules_dir else cfg.demo_dir / "rules"
    if cfg.rules_dir and not root.is_dir():
        raise FileNotFoundError(f"--rules-dir {str(root)!r} does not exist; run scripts/compare_rules.py first")
    if not root.is_dir():
        return {}
    return {p.parent.name: read_ratings(p) for p in sorted(root.glob("*/ratings.parquet"))}


def choose_heuristics(cfg: ExperimentConfig, quality: dict[str, dict]) -> tuple[list[str], str]:
    """Which heuristics get a 50 % arm, and why (said in the results)."""
    if cfg.heuristics == "all":
        return list(HEURISTIC_CANDIDATES), ("all three heuristics were trained; the best is the one with the lowest "
                                            "mean held-out loss")
    best = max(HEURISTIC_CANDIDATES, key=lambda h: quality[h]["mean_auroc"])
    scores = ", ".join(f"{h} {quality[h]['mean_auroc']:.3f}" for h in HEURISTIC_CANDIDATES)
    return [best], (f"one heuristic arm, to fit the time budget: the heuristic whose ranking best separates clean "
                    f"pairs from the planted defects (mean AUROC over the defect kinds: {scores}) — the same "
                    f"criterion the raters are judged by below; --heuristics all trains all three")


# ----------------------------------------------------------------------------- subsets
def subset_ids(arm: Arm, seed: int, rankings: dict[str, pd.DataFrame], universe: pd.Series) -> list[str]:
    """The ids one arm keeps for one seed (selection seed = seed)."""
    if arm.source == "all":
        return universe.astype(str).tolist()
    table = rankings[arm.source]
    kept = prune_table(table, arm.strategy, arm.retention, seed=seed)
    return kept["id"].astype(str).tolist()


def write_subset(ids: Sequence[str], pairs: pd.DataFrame, path: Path) -> Path:
    """The selected rows of the pairs table (absolute image paths, file order) as a CSV; a rerun must
    select exactly the same rows (else the ratings changed under the experiment)."""
    chosen = set(ids)
    rows = pairs[pairs["id"].isin(chosen)]
    if path.is_file():
        old = set(pd.read_csv(path, dtype=str, keep_default_na=False)["id"])
        if old != chosen:
            raise DataError(f"{str(path)!r} holds another subset than this run selects (the ratings or the "
                            "selection changed); use a new --out or delete the experiment folder")
        return path
    with atomic_open(path) as f:
        rows.to_csv(f, index=False)
    return path


def composition(ids: Sequence[str], defects: pd.DataFrame) -> dict[str, float]:
    """Share of each planted kind among the selected rows."""
    kinds = defects.set_index("id")["kind"].reindex(list(ids))
    shares = kinds.value_counts(normalize=True)
    return {k: float(shares.get(k, 0.0)) for k in KINDS}


# ----------------------------------------------------------------------------- feature caches
def build_caches(cfg: ExperimentConfig, base: T2IConfig, subsets: dict, progress: bool = True) -> dict:
    """One feature cache per distinct subset (keyed by its ids), sharing one val cache by a symlink.

    Returns {key: cache dir} for the {key: subset csv} given. Encoding the images and captions every
    epoch would otherwise take about 40 % of a CPU run (demo config: 0.3 s per batch of 32 next to a
    0.5 s optimizer step, and twice the forward pass of the held-out evaluation).
    """
    from alchemist.build import build_text_encoder, build_tokenizer
    from alchemist.data.cache import CacheDataset, build_cache

    root = cfg.out_dir / "cache"
    device = torch.device("cpu")
    encoders = []

    def build(table, where):
        try:
            CacheDataset(where, table)  # opens only a complete cache of exactly this table
            return
        except DataError:
            pass
        if not encoders:
            encoders.extend([build_tokenizer(base.model, device), build_text_encoder(base.model, device)])
        build_cache(table, where, *encoders, base.data.image_size, batch_size=64, dtype="float32", progress=False)

    val_dir = root / "val"
    build(load_pairs(base.data.val_csv_path, base.data), val_dir)
    out: dict[str, Path] = {}
    todo = {}
    for key, csv in subsets.items():
        table = load_pairs(csv, base.data)
        digest = _ids_digest(table["id"].tolist())
        todo.setdefault(digest, table)
        out[key] = root / f"sub_{digest}"
    for digest, table in tqdm(todo.items(), desc="feature caches", disable=not progress):
        d = root / f"sub_{digest}"
        build(table, d / "train")
        link = d / "val"
        if not link.exists():
            try:
                link.symlink_to(Path("..") / "val", target_is_directory=True)
            except OSError:  # no symlinks here: a copy does as well
                shutil.copytree(val_dir, link)
    return out


# ----------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Job:
    arm: Arm
    seed: int
    subset: str  # CSV path
    config: T2IConfig  # the run's
    eval: dict  # n_generate, classifier path, demo data dir


def run_config(base: T2IConfig, subset: Path, name: str, epochs: int, seed: int, cache_dir: Path | None,
               progress: bool = True) -> T2IConfig:
    """One run's T2I config: the base with its subset, folder, epochs and seed (plain dataclass
    replacement: going through load_config costs seconds per config)."""
    data = dataclasses.replace(base.data, train_csv_path=str(subset))
    if cache_dir is not None:  # reading a cache is cheap; a loader worker would only take a core
        data = dataclasses.replace(data, cache_dir=str(cache_dir), num_workers=0)
    return dataclasses.replace(base, data=data, optim=dataclasses.replace(base.optim, ep=epochs),
                               output=dataclasses.replace(base.output, exp_name=name),
                               logging=dataclasses.replace(base.logging, progress=base.logging.progress and progress),
                               seed=seed)


def run_dir_of(cfg: T2IConfig) -> Path:
    return cfg.output.run_dir


def _dotted(raw: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# what does not change what a run computes: logging, loader workers, and where things live (the
# subset behind a path is checked by write_subset; moving the experiment folder must not retrain it)
IGNORED_WHEN_RESUMING = ("logging.", "data.num_workers", "data.train_csv_path", "data.val_csv_path", "data.cache_dir",
                         "model.ckpt_path", "output.local_out_dir_path")


def check_run_dir(cfg: T2IConfig) -> None:
    """A run folder started with another config (other epochs, model, subset...) must not be resumed
    or reused: its schedule and weights belong to that config."""
    path = run_dir_of(cfg) / "config.json"
    if not path.is_file():
        return
    old = _dotted(json.loads(path.read_text()))
    new = _dotted(config_to_dict(cfg))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                  and not k.startswith(IGNORED_WHEN_RESUMING))
    if diff:
        raise ConfigError(f"run folder {str(run_dir_of(cfg))!r} was started with another config (differs in "
                          f"{', '.join(diff[:4])}); use a new --out, or delete that folder to retrain it")


def finished_summary(run_dir: Path, epochs: int) -> dict | None:
    """The run's summary when it trained all ``epochs``; the held-out loss falls back to the last
    epoch of metrics.jsonl (a run resumed after its final checkpoint logs no new epoch)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    if s.get("epochs") != epochs:
        return None
    if not _finite(s.get("heldout_loss")):
        curve = loss_curve(run_dir)
        if not curve or curve[-1]["epoch"] != epochs:
            return None
        s["heldout_loss"] = curve[-1]["heldout_loss"]
    return s


def loss_curve(run_dir: Path) -> list[dict]:
    """[{epoch, step, heldout_loss}] from metrics.jsonl, the last entry per epoch (a resumed run may
    have logged an epoch twice)."""
    from alchemist.utils.metrics import read_jsonl

    path = run_dir / "metrics.jsonl"
    by_epoch = {}
    for rec in read_jsonl(path) if path.is_file() else []:
        if "heldout_loss" in rec:
            by_epoch[int(rec["epoch"])] = {"epoch": int(rec["epoch"]), "step": int(rec["step"]),
                                           "heldout_loss": float(rec["heldout_loss"])}
    return [by_epoch[e] for e in sorted(by_epoch)]


_SHARED: dict[str, Any] = {}  # per process: encoders, classifier and prompts, loaded once


def _shared(cfg: T2IConfig, ev: dict):
    from alchemist.build import build_text_encoder, build_tokenizer
    from alchemist.evaluation.attributes import load_attribute_classifier, load_clean_demo

    key = json.dumps([config_to_dict(cfg.model), ev], sort_keys=True)
    if _SHARED.get("key") != key:
        device = torch.device("cpu")
        real, rows = load_clean_demo(ev["data_dir"], "val")
        n = min(ev["n_generate"], len(rows))
        _SHARED.update(key=key, vqvae=build_tokenizer(cfg.model, device), text=build_text_encoder(cfg.model, device),
                       clf=load_attribute_classifier(ev["classifier"]) if n else None,
                       real=real[:n], rows=rows.iloc[:n].reset_index(drop=True))
    return _SHARED


def evaluate_run(cfg: T2IConfig, ev: dict) -> dict:
    """GenEval-lite and FID-lite of the run's final weights on the first N clean val captions
    (generated with the config's cfg / top-k / top-p and the run's seed)."""
    from alchemist.build import build_proxy
    from alchemist.evaluation.metrics import fid_lite, generate_for_prompts, geneval_lite
    from alchemist.utils.checkpoint import latest_checkpoint, load_checkpoint

    if ev["n_generate"] == 0:
        return {}
    sh = _shared(cfg, ev)
    ckpt = latest_checkpoint(run_dir_of(cfg))
    if ckpt is None:
        raise FileNotFoundError(f"run {str(run_dir_of(cfg))!r} has no checkpoint to evaluate")
    proxy = build_proxy(cfg.model, sh["text"].width, torch.device("cpu"))
    proxy.load_state_dict(load_checkpoint(ckpt)["proxy"])
    proxy.eval()
    m = cfg.model
    gen = generate_for_prompts(proxy, sh["vqvae"], sh["text"], sh["rows"]["caption"].tolist(), cfg=m.cfg,
                               top_k=m.top_k, top_p=m.top_p, seed=cfg.seed)
    ge = geneval_lite(sh["clf"], gen, sh["rows"])
    return {"geneval": ge["mean"], "geneval_all_correct": ge["all_correct"],
            "geneval_per_attribute": {k: v for k, v in ge.items() if k not in ("mean", "all_correct")},
            "fid_lite": fid_lite(sh["clf"], gen, sh["real"]), "n_generated": len(gen)}


def reference_metrics(ev: dict) -> dict:
    """What real images score: GenEval-lite of the prompts' own images (the ceiling the classifier
    allows) and FID-lite of the next N clean val images against them (the floor at this sample size)."""
    from alchemist.evaluation.attributes import load_attribute_classifier, load_clean_demo
    from alchemist.evaluation.metrics import fid_lite, geneval_lite

    if not ev["n_generate"]:
        return {}
    real, rows = load_clean_demo(ev["data_dir"], "val")
    n = min(ev["n_generate"], len(rows))
    clf = load_attribute_classifier(ev["classifier"])
    ge = geneval_lite(clf, real[:n], rows.iloc[:n])
    out = {"geneval": ge["mean"], "geneval_all_correct": ge["all_correct"], "n": n, "fid_lite": None}
    if len(rows) >= 2 * n:
        out["fid_lite"] = fid_lite(clf, real[n:2 * n], real[:n])
    return out


def run_job(job: Job) -> dict:
    """Train (unless finished) and evaluate (unless done with the same settings) one (arm, seed)."""
    cfg = job.config
    run_dir = run_dir_of(cfg)
    t0 = time.perf_counter()
    summary = finished_summary(run_dir, cfg.optim.ep)
    trained_now = summary is None
    if trained_now:
        from alchemist.evaluation.train import train_t2i

        train_t2i(cfg)
        summary = finished_summary(run_dir, cfg.optim.ep)
        if summary is None:
            raise RuntimeError(f"run {str(run_dir)!r} finished without a held-out loss for its last epoch")
        _write_json({"seconds": time.perf_counter() - t0}, run_dir / "train_time.json")
    train_s = json.loads((run_dir / "train_time.json").read_text())["seconds"] \
        if (run_dir / "train_time.json").is_file() else math.nan
    t1 = time.perf_counter()
    eval_path = run_dir / "eval.json"
    settings = {k: job.eval[k] for k in ("n_generate", "classifier_sha1")} | {
        "cfg": cfg.model.cfg, "top_k": cfg.model.top_k, "top_p": cfg.model.top_p, "step": summary["steps"]}
    done = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    if done is None or done.get("settings") != settings:
        done = {"settings": settings, "metrics": evaluate_run(cfg, job.eval), "seconds": time.perf_counter() - t1}
        _write_json(done, eval_path)
    return {"arm": job.arm.name, "seed": job.seed, "selection_seed": job.seed if job.arm.sampled else None,
            "train_seed": cfg.seed, "subset": job.subset, "run_dir": str(run_dir),
            "train_rows": _count_rows(job.subset),
            "steps": summary["steps"], "epochs": summary["epochs"], "heldout_loss": summary["heldout_loss"],
            "curve": loss_curve(run_dir), **done["metrics"], "train_seconds": train_s,
            "eval_seconds": done["seconds"], "trained_now": trained_now}


def _count_rows(csv: str) -> int:
    """Rows of a subset CSV (train_t2i returns train_rows but does not write it to summary.json)."""
    return len(pd.read_csv(csv, dtype=str, keep_default_na=False, usecols=["id"]))


def _init_worker(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    set_threads(threads)


# ----------------------------------------------------------------------------- the experiment
def plan_arms(heuristics: Sequence[str]) -> list[Arm]:
    arms = rater_arms()
    return arms[:4] + [heuristic_arm(h) for h in heuristics] + arms[4:]


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
    quality = planted_quality({"rater": inp.ratings, **{f"rule:{k}": v for k, v in rules.items()}, **heur},
                              inp.defects)
    chosen, why = choose_heuristics(cfg, quality)
    arms = plan_arms(chosen)
    rankings = {"rater": inp.ratings, **heur}

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


def _run_all(jobs: list[Job], cfg: ExperimentConfig, progress: bool) -> list[dict]:
    bar = tqdm(total=len(jobs), desc="experiment runs", disable=not progress)
    if cfg.jobs == 1:
        out = []
        for job in jobs:
            out.append(run_job(job))
            bar.update(1)
        bar.close()
        return out
    with cf.ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=mp.get_context("spawn"),
                                initializer=_init_worker, initargs=(cfg.threads,)) as pool:
        futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
        out: list[dict | None] = [None] * len(jobs)
        for fut in cf.as_completed(futures):
            out[futures[fut]] = fut.result()
            bar.update(1)
    bar.close()
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- results
METRICS = (("heldout_loss", "held-out loss ↓", "{:.4f}"), ("geneval", "GenEval-lite ↑", "{:.3f}"),
           ("geneval_all_correct", "all-correct ↑", "{:.3f}"), ("fid_lite", "FID-lite ↓", "{:.4g}"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.node()}: {cpu}, {n} CPU cores usable, {platform.system()} {platform.release()}, " \
           f"torch {torch.__version__}"


def summarise(cfg: ExperimentConfig, inp: Inputs, arms: list[Arm], records: list[dict], quality: dict,
              chosen: list[str], why: str, clf_stats: dict | None, command: str, seconds: float) -> dict:
    per_arm = []
    for arm in arms:
        recs = [r for r in records if r["arm"] == arm.name]
        row = {"arm": arm.name, "label": arm.label, "source": arm.source, "strategy": arm.strategy,
               "retention": arm.retention, "n_seeds": len(recs), "train_rows": recs[0]["train_rows"],
               "steps": recs[0]["steps"]}
        for key, _, _ in METRICS:
            m, s = mean_std([r.get(key) for r in recs])
            row[key] = {"mean": m, "std": s, "values": [r.get(key) for r in recs]}
        row["composition"] = {k: float(np.mean([r["composition"][k] for r in recs])) for k in KINDS}
        per_arm.append(row)
    best_heur = None
    heur_rows = [a for a in per_arm if a["source"] in HEURISTIC_CANDIDATES]
    if heur_rows:
        best_heur = min(heur_rows, key=lambda a: a["heldout_loss"]["mean"])["arm"]
    m = inp.base.model
    return {
        "command": command, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "jobs": cfg.jobs, "threads": cfg.threads, "seconds": seconds,
        "config": {**dataclasses.asdict(cfg), "epochs": inp.epochs,
                   "t2i": {"depth": m.depth, "bs": inp.base.optim.bs, "tlr": inp.base.optim.tlr,
                           "image_size": inp.base.data.image_size, "cfg": m.cfg, "top_k": m.top_k, "top_p": m.top_p}},
        "n_rated": len(inp.ratings), "demo_counts": inp.defects["kind"].value_counts().reindex(KINDS, fill_value=0)
        .astype(int).to_dict(),
        "heuristics": {"trained": chosen, "why": why, "best": best_heur},
        "classifier": clf_stats, "planted": quality, "arms": per_arm, "runs": records,
    }


def _fmt(stat: dict, fmt: str) -> str:
    if not _finite(stat["mean"]):
        return "–"
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def _verdict(results: dict) -> list[str]:
    """Plain comparisons of the claim's three pairs, with the seed spread to judge them by."""
    arms = {a["arm"]: a for a in results["arms"]}
    lines = []

    def cmp(a, b, key="heldout_loss", lower=True):
        if a not in arms or b not in arms:
            return
        x, y = arms[a][key], arms[b][key]
        if not (_finite(x["mean"]) and _finite(y["mean"])):
            return
        diff = x["mean"] - y["mean"]
        spread = math.hypot(x["std"], y["std"])
        better = (diff < 0) == lower
        size = "within the seed spread" if abs(diff) <= spread else ("better" if better else "worse")
        lines.append(f"- {arms[a]['label']} vs {arms[b]['label']}: {x['mean']:.4f} vs {y['mean']:.4f} "
                     f"(Δ {diff:+.4f}, spread {spread:.4f}): **{size}**.")

    cmp("shift_gsample_50", "random_50")
    cmp("shift_gsample_50", "full")
    cmp("shift_gsample_50", "topk_50")
    cmp("shift_gsample_20", "random_20")
    if results["heuristics"]["best"]:
        cmp("shift_gsample_50", results["heuristics"]["best"])
    return lines


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def render_markdown(results: dict, figure: Path, doc: Path) -> str:
    c = results["config"]
    t2i = c["t2i"]
    n_seeds = len(c["seeds"])
    counts = ", ".join(f"{v} {k}" for k, v in results["demo_counts"].items())
    fig_rel = os.path.relpath(figure, doc.parent)
    run_minutes = sum(r["train_seconds"] + r["eval_seconds"] for r in results["runs"]
                      if _finite(r["train_seconds"])) / 60
    epochs = f"{c['epochs']} epoch{'s' if c['epochs'] != 1 else ''}"
    lines = [SECTION_START,
             "## Selection experiment: Alchemist subset vs random, Top-K, heuristics and full data",
             "",
             "_Generated by `alchemist.evaluation.experiment`; rerunning the command replaces this section._",
             "",
             f"- Command: `{results['command'] or 'run_experiment(...)'}`",
             f"- Date: {results['date']}; this invocation {results['seconds'] / 60:.1f} min wall; the runs' own "
             f"training + evaluation {run_minutes:.1f} min summed over runs ({results['jobs']} parallel run(s), "
             f"{results['threads']} torch thread(s) each)",
             f"- Machine: {results['machine']}",
             f"- Data: the demo's {results['n_rated']} rated training pairs ({counts}); clean val split for the "
             f"held-out loss and the prompts.",
             f"- Downstream model: `{c['t2i_config']}` (depth {t2i['depth']}, {t2i['image_size']} px, batch "
             f"{t2i['bs']}, lr {t2i['tlr']:g}), **{epochs} in every arm** (a 50 % subset gets half "
             f"the steps), seeds {list(c['seeds'])} (the seed sets both the selection of the sampled arms and "
             f"the training).",
             f"- Generation: the first {c['n_generate']} clean val captions, cfg {t2i['cfg']:g}, top-k "
             f"{t2i['top_k']}, top-p {t2i['top_p']:g}; GenEval-lite and FID-lite (vs the same captions' real "
             f"images) judged by the attribute classifier"
             + (f" (held-out accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                   results["classifier"]["heldout_accuracy"].items()) + ")"
                if results.get("classifier") else "") + ".",
             f"- Heuristic arm(s): {results['heuristics']['why']}.",
             "",
             f"### Downstream results (mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''})",
             ""]
    header = ["arm", "rows", "steps"] + [h for _, h, _ in METRICS] + ["clean share"]
    rows = []
    for a in results["arms"]:
        label = a["label"] + (" (best heuristic)" if a["arm"] == results["heuristics"]["best"]
                              and len(results["heuristics"]["trained"]) > 1 else "")
        rows.append([label, str(a["train_rows"]), str(a["steps"])] + [_fmt(a[k], f) for k, _, f in METRICS]
                    + [f"{a['composition']['clean']:.0%}"])
    ref = results.get("reference") or {}
    if ref:
        fid = f"{ref['fid_lite']:.4g}" if _finite(ref.get("fid_lite")) else "–"
        rows.append([f"_real val images (reference, {ref['n']})_", "", "", "–", f"{ref['geneval']:.3f}",
                     f"{ref['geneval_all_correct']:.3f}", fid, ""])
    lines += [_md_table(header, rows), ""]
    if ref:
        lines += ["The reference row scores real images: GenEval-lite of the prompts' own images (the most the "
                  "classifier can confirm) and FID-lite of the next clean val images against them (the floor at "
                  "this number of images).", ""]
    lines += [f"![held-out loss per epoch for each arm]({fig_rel})", ""]
    verdict = _verdict(results)
    if verdict:
        lines += ["Reading (held-out token loss; a difference within the combined seed spread is not a result):",
                  "", *verdict, ""]
    lines += ["### What each subset holds (share of the planted kinds, mean over seeds)", ""]
    lines += [_md_table(["arm"] + list(KINDS),
                        [[a["label"]] + [f"{a['composition'][k]:.1%}" for k in KINDS] for a in results["arms"]]), ""]

    planted = results["planted"]
    lines += ["### Rankings on planted defects (no downstream training)", "",
              "AUROC of the ranking score, clean pairs (positive) vs each planted kind: 1 = every clean pair "
              "above every pair of the kind, 0.5 = chance. `plain` below 0.5 is the expected shape for a rater "
              "(the paper's top ranks are plain, easy images, which Shift-Gsample's shift drops).", ""]
    kinds = [k for k in DEFECT_KINDS if any(k in q["auroc"] for q in planted.values())]
    lines += [_md_table(["ranking"] + kinds + ["mean"],
                        [[_ranking_label(n)] + [f"{q['auroc'].get(k, math.nan):.3f}" for k in kinds]
                         + [f"{q['mean_auroc']:.3f}"] for n, q in planted.items()]), ""]
    for name, q in planted.items():
        if name in HEURISTIC_CANDIDATES:
            continue
        lines += [f"Rank deciles of {_ranking_label(name)} (share of each kind in each tenth of the ranking, "
                  "0 = best):", ""]
        lines += [_md_table(["kind", "n"] + [str(d) for d in range(N_DECILES)],
                            [[k, str(q["n"][k])] + [f"{x:.0%}" for x in row] for k, row in q["deciles"].items()]), ""]
    if not any(n.startswith("rule:") for n in planted):
        lines += ["_No per-rule ratings were found (`<demo>/rules/<rule>/ratings.parquet` from "
                  "scripts/compare_rules.py); only the main rater is shown._", ""]
    lines += ["Not run: an equal-steps variant (smaller subsets trained for proportionally more epochs); it "
              "would double the cost of the 50 % arms.", "", SECTION_END]
    return "\n".join(lines) + "\n"


def _ranking_label(name: str) -> str:
    if name == "rater":
        return "rater (ratings.parquet)"
    if name.startswith("rule:"):
        return f"rater, rule `{name[5:]}`"
    return f"heuristic `{name}`"


def write_doc_section(path: Path, section: str) -> Path:
    """Replace the experiment's marked section of ``path`` (or append it; create the file if needed)."""
    old = path.read_text() if path.is_file() else "# Results\n"
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END) + r"\n?", re.S)
    new = pattern.sub(lambda _: section, old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + section
    with atomic_open(path) as f:
        f.write(new)
    return path


def plot_loss_curves(results: dict, out: Path) -> Path:
    """Held-out loss per arm over epochs and over optimizer steps: mean over seeds, min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    cmap = plt.get_cmap("tab10")
    for i, a in enumerate(results["arms"]):
        curves = [r["curve"] for r in results["runs"] if r["arm"] == a["arm"] and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        loss = np.array([[p["heldout_loss"] for p in c[:n]] for c in curves])
        epochs = np.array([p["epoch"] for p in curves[0][:n]])
        steps = np.array([p["step"] for p in curves[0][:n]])
        style = dict(color="k" if a["source"] == "all" else cmap(i % 10),
                     ls="--" if a["retention"] < 0.5 else "-", marker="o", ms=3)
        for ax, x in zip(axes, (epochs, steps)):
            ax.plot(x, loss.mean(0), label=a["label"], **style)
            if len(curves) > 1:
                ax.fill_between(x, loss.min(0), loss.max(0), color=style["color"], alpha=0.15, lw=0)
    axes[0].set(xlabel="epoch", ylabel="held-out token loss", title="held-out loss per epoch (same epochs)")
    axes[1].set(xlabel="optimizer steps", ylabel="held-out token loss", title="the same against steps")
    axes[0].legend(frameon=False, fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out
