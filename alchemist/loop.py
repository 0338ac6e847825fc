"""The training loop every trainer shares: epochs of steps with a progress bar, JSONL/wandb
metrics, atomic rotating checkpoints, exact resume and a guard against non-finite losses.

A subclass says what one epoch's batches are (``epoch_batches``), what a step does (``train_step``,
returning the numbers to log or None for a non-finite loss) and which extra state it owns.
``run`` is the one run path every entry point takes: resume, save the config, fit, list the
skipped rows.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from alchemist.batch import TokenBatch
from alchemist.config import config_to_dict, save_config
from alchemist.runtime import amp_dtype, autocast, resume_checkpoint
from alchemist.utils.checkpoint import capture_rng, checkpoint_dir, gather_rng, restore_rank_rng, save_checkpoint
from alchemist.utils.dist import all_ranks, is_dist
from alchemist.utils.io import remove_stale_temps, write_json
from alchemist.utils.metrics import MetricsLogger, trim_metrics
from alchemist.utils.schedule import lr_factor, warmup_steps
from alchemist.utils.update import apply_update, scaled_backward


class NonFiniteLossError(RuntimeError):
    pass


LOAD = object()  # TrainLoop.run's default: load the checkpoint output.resume names


class TrainLoop:
    desc = "train"

    def __init__(self, cfg, featurize: Callable[[Any], TokenBatch | None], steps_per_epoch: int,
                 device: torch.device, is_main: bool = True, on_skipped: Callable[[list], None] = lambda s: None):
        self.cfg, self.featurize, self.device, self.is_main, self.on_skipped = cfg, featurize, device, is_main, on_skipped
        self.step_idx, self.epoch, self.nonfinite_run, self.nonfinite_total = 0, 0, 0, 0
        self.last_metrics: dict[str, float] = {}  # the latest logged numbers: checkpointed, for summary.json
        self.skip_log, self.skip_path = None, None  # set by run(): written at every checkpoint
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.optim.ep
        self.warmup_steps = warmup_steps(cfg.optim.wp, cfg.optim.ep, steps_per_epoch)
        self.run_dir: Path = cfg.output.run_dir
        self.logger = MetricsLogger(self.run_dir / "metrics.jsonl", cfg.logging, config_to_dict(cfg),
                                    cfg.output.exp_name, is_main)
        self.amp_dtype = amp_dtype(cfg.optim, device)
        self.fp16_scaling = self.amp_dtype == torch.float16

    def autocast(self):
        return autocast(self.amp_dtype, self.device)

    def lr_factor(self, sche: str = "") -> float:
        """The multiplier of the peak lr at the current step, by schedule ``sche`` (default ``optim.sche``)."""
        o = self.cfg.optim
        return lr_factor(sche or o.sche, self.step_idx, self.warmup_steps, self.total_steps, o.wp0, o.wpe)

    def new_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.fp16_scaling)

    def optimizer_step(self, model: torch.nn.Module, opt, loss: torch.Tensor, scaler) -> torch.Tensor | float:
        """Backward, average over ranks, clip, step; returns the gradient norm before clipping (on the device)."""
        if opt is None:
            return 0.0
        gnorm = self.backward(model, opt, loss, scaler)
        self.step(opt, scaler)
        return gnorm

    def backward(self, model: torch.nn.Module, opt, loss: torch.Tensor, scaler) -> torch.Tensor:
        """The first half of ``optimizer_step``: gradients averaged over ranks, unscaled and clipped, as
        the optimiser will see them (every rank's scaler sees the same ones: ``alchemist.utils.update``);
        returns their norm before clipping."""
        return scaled_backward(loss, model, opt, scaler, self.cfg.optim.grad_clip)

    @staticmethod
    def step(opt, scaler) -> None:
        """The second half of ``optimizer_step``: the update, then the gradients are cleared."""
        apply_update(opt, scaler)

    # -------------------------------------------------------------- what subclasses provide
    def epoch_batches(self) -> Iterator[tuple]:
        raise NotImplementedError

    def train_step(self, *batches: TokenBatch) -> dict[str, float] | None:
        raise NotImplementedError

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def end_of_epoch(self) -> dict[str, float]:
        """Numbers to log once an epoch is over (e.g. a held-out evaluation)."""
        return {}

    def final_summary(self) -> dict[str, Any]:
        return {}

    # -------------------------------------------------------------- the loop
    def run(self, skip_log, rank: int = 0, world: int = 1, resumed: Any = LOAD) -> dict[str, Any]:
        """Resume (``output.resume``), bring the run's records to the checkpoint, fit, summarise.

        ``resumed``: what ``runtime.resume_checkpoint`` returned, when the caller loaded it before
        the data and models (a bad checkpoint then fails first); by default it is loaded here.

        Records: stale temp files of killed writes are removed; metrics.jsonl is cut to the
        checkpoint's step (``trim_metrics``); the bad rows ``skip_log`` (a ``SkipLog``) holds, and
        those an earlier run had listed, go to skipped.csv (skipped_rank<r>.csv with several
        processes) before the first step, at every checkpoint and at the end; summary.json is
        written from the checkpointed state, so a run killed at any point and started again ends
        with the records of a run never stopped.
        """
        self.skip_log = skip_log
        self.skip_path = self.run_dir / ("skipped.csv" if world == 1 else f"skipped_rank{rank}.csv")
        if self.is_main:
            for folder in (self.run_dir, checkpoint_dir(self.run_dir)):
                remove_stale_temps(folder)
        if is_dist():
            torch.distributed.barrier()  # no rank writes before the stale temp files are gone
        if resumed is LOAD:
            resumed = resume_checkpoint(self.cfg.output)
        if resumed is not None:
            self.load_state_dict(resumed[1])
            if self.skip_path.is_file():
                skip_log.read(self.skip_path)
            if self.is_main:
                print(f"resumed from {resumed[0]} at step {self.step_idx}")
        if self.is_main:
            trim_metrics(self.logger.path, None if resumed is None else (self.step_idx, self.epoch))
            save_config(self.cfg, self.run_dir / "config.json")
        skip_log.write(self.skip_path)
        try:
            summary = self.fit()
        finally:
            skip_log.write(self.skip_path)
        summary["skipped_rows"] = skip_log.count
        if self.is_main:
            write_json(summary, self.run_dir / "summary.json")
        return summary

    def fit(self) -> dict[str, Any]:
        bar = tqdm(total=self.total_steps, initial=self.step_idx, desc=self.desc, dynamic_ncols=True,
                   disable=not (self.is_main and self.cfg.logging.progress))
        last, t0, n_img = self.last_metrics, time.perf_counter(), 0
        while self.epoch < self.cfg.optim.ep:
            for raws in self.epoch_batches():
                batches = [self.featurize(r) for r in raws]
                self.on_skipped([s for r in raws for s in r.get("skipped", [])])
                # all ranks skip together: one that left alone would leave the others' all-reduces unpaired
                if not all_ranks(all(b is not None and b.B > 0 for b in batches)):
                    continue
                m = self.train_step(*batches)
                self._count_nonfinite(m is None)
                self.step_idx += 1
                n_img += sum(b.B for b in batches)
                bar.update(1)
                if m is not None:
                    last = self.last_metrics = {**m, "img_per_s": n_img / (time.perf_counter() - t0)}
                    bar.set_postfix({k: f"{last[k]:.3g}" for k in self.progress_keys if k in last})
                    if self.step_idx % self.cfg.logging.log_every == 0:
                        self.logger.log({"step": self.step_idx, "epoch": self.epoch, **last})
                if self.step_idx % self.cfg.output.save_every == 0:
                    self.save()
            self.epoch += 1
            end = self.end_of_epoch()
            if end:
                self.logger.log({"step": self.step_idx, "epoch": self.epoch, **end})
                last.update(end)
            self.save()
        bar.close()
        summary = {"steps": self.step_idx, "epochs": self.epoch, "nonfinite_steps": self.nonfinite_total,
                   "processes": torch.distributed.get_world_size() if is_dist() else 1, **self.final_summary(), **last}
        self.logger.close()
        return summary

    progress_keys = ("loss", "img_per_s", "lr")

    def _count_nonfinite(self, bad: bool) -> None:
        if not bad:
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        self.nonfinite_total += 1
        for opt in self.optimizers():
            opt.zero_grad(set_to_none=True)
        if self.nonfinite_run >= self.cfg.optim.max_nonfinite:
            path = self.save()
            raise NonFiniteLossError(
                f"{self.nonfinite_run} consecutive steps had a non-finite loss (step {self.step_idx}); "
                f"lower optim.tlr or use optim.fp16=0 or 2. Last good state: {path}")

    # -------------------------------------------------------------- checkpoints
    def state_dict(self, rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """``rng``: every rank's RNG state (``gather_rng``, a collective); this process's alone when not given."""
        return {"step": self.step_idx, "epoch": self.epoch, "nonfinite_total": self.nonfinite_total,
                "rng": rng if rng is not None else [capture_rng()], "config": config_to_dict(self.cfg),
                "last_metrics": dict(self.last_metrics),
                **self.extra_state()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.load_extra_state(ckpt)
        self.step_idx, self.epoch, self.nonfinite_total = ckpt["step"], ckpt["epoch"], ckpt["nonfinite_total"]
        self.last_metrics = dict(ckpt.get("last_metrics", {}))
        if not restore_rank_rng(ckpt["rng"]) and self.is_main:
            print("note: the checkpoint was written by another number of processes; each keeps its own seed "
                  "and the resume is not exact")

    def save(self) -> Path | None:
        """A checkpoint (main process), and every process's skipped rows so far."""
        if self.skip_log is not None:
            self.skip_log.write(self.skip_path)
        rng = gather_rng()  # a collective: every rank saves, rank 0 writes
        if not self.is_main:
            return None
        return save_checkpoint(self.run_dir, self.step_idx, self.state_dict(rng), self.cfg.output.keep_last)
