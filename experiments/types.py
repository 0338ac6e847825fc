"""The experiments' shared types and constants: the bottom of the package, imported by every other
module of it and importing none of them (only ``alchemist``).

- ``KINDS``: what a demo pair can be, ``clean`` or one of the planted defects;
- ``Arm``: one way of picking the training subset in the selection experiment;
- ``ExperimentConfig`` (+ ``quick_config``): the selection experiment's settings;
- ``Inputs``: what the experiment reads from a demo folder before it trains anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from alchemist.config import ConfigError, T2IConfig
from alchemist.selection import SEEDED

KINDS = ("clean", "plain", "noise", "misaligned", "duplicate", "blurred")
DEFECT_KINDS = tuple(k for k in KINDS if k != "clean")
BENCHMARKS = ("demo", "digits")  # generated scenes; real handwritten-digit scans
HEURISTIC_CANDIDATES = ("clarity", "lowfreq", "edge_density")

# set per run by the experiment; an override of these would be silently replaced, so it is refused
RUN_KEYS = ("data.train_csv_path", "data.val_csv_path", "data.cache_dir", "output.local_out_dir_path",
            "output.exp_name", "output.resume", "optim.ep", "seed")
QUICK = {"epochs": 1, "n_generate": 8, "classifier_epochs": 1, "classifier_extra": 0}
QUICK_T2I = {"model.depth": 1}


def finite(x) -> bool:
    """A real, finite number (not None, NaN or a string)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


# ----------------------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    name: str  # folder-safe id, e.g. "shift_gsample_50"
    source: str  # "all" (full data), "rater", "rule:<rule>" or a heuristic name: whose ranking is used
    strategy: str  # selection strategy ("all" for full data)
    retention: float

    @property
    def sampled(self) -> bool:
        return self.strategy in SEEDED

    @property
    def label(self) -> str:
        if self.source == "all":
            return "full data"
        what = {"random": "random", "shift_gsample": "Shift-Gsample", "topk": "Top-K", "gsample": "Gsample",
                "block": "block", "bottomk": "Bottom-K"}.get(self.strategy, self.strategy)
        if self.source.startswith("rule:"):
            return f"{what} {self.retention:.0%} ({self.source[5:]} rater)"
        if self.source not in ("rater", "all") and self.strategy == "topk":
            what = f"{self.source} (top)"
        return f"{what} {self.retention:.0%}"


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ExperimentConfig:
    demo: str = "runs/demo"  # data/, tokenizer.pt (via the T2I config) and ratings.parquet
    out: str = ""  # "" = <demo>/experiment (quick: <demo>/experiment_quick)
    ratings: str = ""  # "" = <demo>/ratings.parquet
    reference: str = ""  # the same rater's ratings of trusted pairs, Shift-Gsample's reference; "" = <demo>/val_ratings.parquet if there
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
    reference: np.ndarray | None = None  # the rater's scores of trusted pairs (``trusted_reference``)
