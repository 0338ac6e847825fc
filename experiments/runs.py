"""One training run per (arm, seed) of the selection experiment: its config and feature cache, training
(skipped when finished, resumed when not), evaluation, and the pool that runs them.

Workers are spawned processes, so what they run (``run_job``, ``_init_worker``) lives at the top level
of this module, which imports nothing of the experiment's report.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from alchemist.build import build_proxy, build_text_encoder, build_tokenizer
from alchemist.config import ConfigError, T2IConfig, config_to_dict
from alchemist.data.cache import CacheDataset, build_cache
from alchemist.data.pairs import DataError, load_pairs
from alchemist.evaluation.metrics import generate_for_prompts
from alchemist.evaluation.train import train_t2i
from alchemist.utils.checkpoint import latest_checkpoint, load_checkpoint
from alchemist.utils.io import write_json
from alchemist.utils.metrics import read_jsonl
from experiments.attributes import fid_lite, geneval_lite, load_attribute_classifier, load_clean_demo
from experiments.types import Arm, ExperimentConfig, finite


# ----------------------------------------------------------------------------- small helpers
def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:12]


def set_threads(threads: int) -> None:
    """Tiny CPU models are per-op-overhead bound, and OpenMP threads that spin while another job holds
    the cores are slower still: 1 thread per process (and ``jobs`` processes) is the default."""
    if threads > 0:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- feature caches
def build_caches(cfg: ExperimentConfig, base: T2IConfig, subsets: dict, progress: bool = True) -> dict:
    """One feature cache per distinct subset (keyed by its ids), sharing one val cache by a symlink.

    Returns {key: cache dir} for the {key: subset csv} given. Encoding the images and captions every
    epoch would otherwise take about 40 % of a CPU run (demo config: 0.3 s per batch of 32 next to a
    0.5 s optimizer step, and twice the forward pass of the held-out evaluation).
    """
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
    if not finite(s.get("heldout_loss")):
        curve = loss_curve(run_dir)
        if not curve or curve[-1]["epoch"] != epochs:
            return None
        s["heldout_loss"] = curve[-1]["heldout_loss"]
    return s


def loss_curve(run_dir: Path) -> list[dict]:
    """[{epoch, step, heldout_loss}] from metrics.jsonl, the last entry per epoch (a resumed run may
    have logged an epoch twice)."""
    path = run_dir / "metrics.jsonl"
    by_epoch = {}
    for rec in read_jsonl(path) if path.is_file() else []:
        if "heldout_loss" in rec:
            by_epoch[int(rec["epoch"])] = {"epoch": int(rec["epoch"]), "step": int(rec["step"]),
                                           "heldout_loss": float(rec["heldout_loss"])}
    return [by_epoch[e] for e in sorted(by_epoch)]


_SHARED: dict[str, Any] = {}  # per process: encoders, classifier and prompts, loaded once


def _shared(cfg: T2IConfig, ev: dict):
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
        train_t2i(cfg)
        summary = finished_summary(run_dir, cfg.optim.ep)
        if summary is None:
            raise RuntimeError(f"run {str(run_dir)!r} finished without a held-out loss for its last epoch")
        write_json({"seconds": time.perf_counter() - t0}, run_dir / "train_time.json")
    train_s = json.loads((run_dir / "train_time.json").read_text())["seconds"] \
        if (run_dir / "train_time.json").is_file() else math.nan
    t1 = time.perf_counter()
    eval_path = run_dir / "eval.json"
    settings = {k: job.eval[k] for k in ("n_generate", "classifier_sha1")} | {
        "cfg": cfg.model.cfg, "top_k": cfg.model.top_k, "top_p": cfg.model.top_p, "step": summary["steps"]}
    done = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    if done is None or done.get("settings") != settings:
        done = {"settings": settings, "metrics": evaluate_run(cfg, job.eval), "seconds": time.perf_counter() - t1}
        write_json(done, eval_path)
    return {"arm": job.arm.name, "seed": job.seed, "selection_seed": job.seed if job.arm.sampled else None,
            "train_seed": cfg.seed, "subset": job.subset, "run_dir": str(run_dir),
            "train_rows": _count_rows(job.subset),
            "steps": summary["steps"], "epochs": summary["epochs"], "heldout_loss": summary["heldout_loss"],
            "curve": loss_curve(run_dir), **done["metrics"], "train_seconds": train_s,
            "eval_seconds": done["seconds"], "trained_now": trained_now}


def _count_rows(csv: str) -> int:
    """Rows of a subset CSV, as listed (summary.json's train_rows counts the usable ones)."""
    return len(pd.read_csv(csv, dtype=str, keep_default_na=False, usecols=["id"]))


def _init_worker(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    set_threads(threads)


# ----------------------------------------------------------------------------- all runs
def run_all(jobs: list[Job], cfg: ExperimentConfig, progress: bool) -> list[dict]:
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
