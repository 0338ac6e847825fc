"""Metrics go to a JSONL file always, and to wandb when enabled (disabled by default)."""
from __future__ import annotations

import json
import netrc
import os
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from alchemist.utils.errors import UserError
from alchemist.utils.io import atomic_open


def check_wandb(cfg: Any) -> None:
    """``logging.wandb=online`` needs a W&B API key (WANDB_API_KEY, or the netrc entry ``wandb login``
    writes); without one ``wandb.init`` fails, or waits for a login, once the data and models are
    loaded. Checked when a run starts, before any data is read."""
    if cfg.wandb != "online" or os.environ.get("WANDB_API_KEY"):
        return
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host or "api.wandb.ai"):
            return
    except (OSError, netrc.NetrcParseError):  # no netrc file, or one wandb could not read either
        pass
    raise UserError("logging.wandb=online needs a W&B API key: set WANDB_API_KEY or run `wandb login`, "
                    "or log with --wandb=offline (synced later) or --wandb=disabled")


class MetricsLogger:
    """``cfg``: the config's logging section (``wandb``, ``wandb_project``); ``run_config``: the run's
    resolved config as a plain dict, recorded by wandb."""

    def __init__(self, path: str | os.PathLike, cfg: Any, run_config: dict[str, Any] | None = None,
                 run_name: str = "", enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        check_wandb(cfg)
        if cfg.wandb != "disabled":
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, name=run_name or None, mode=cfg.wandb,
                                     config=run_config,
                                     dir=str(self.path.parent), resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                            step=record.get("step"))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def host_floats(values: dict[str, Any]) -> dict[str, Any]:
    """The same dict with every 0-dim tensor turned into a float by one device-to-host copy: a
    step's logged numbers cost one sync, not one ``.item()`` each."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(values)
    got = torch.stack([values[k].detach().float().reshape(()) for k in keys]).tolist()
    return {**values, **dict(zip(keys, got))}


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trim_metrics(path: str | os.PathLike, upto: tuple[int, int] | None) -> int:
    """Make a run's metrics file what the run has logged up to its checkpoint, before a resumed run
    appends to it: keep the records at (step, epoch) <= ``upto`` (the checkpoint's; None keeps
    nothing: a fresh start), once each, and drop a line torn by a kill. Records are logged in
    increasing (step, epoch) order (an epoch-end record has the new epoch), so that order is the
    checkpoint's cut. Returns how many records were dropped.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, seen, dropped = [], set(), 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            key = (int(rec["step"]), int(rec["epoch"]))
        except (ValueError, KeyError, TypeError):  # a torn last line, or not a record
            dropped += bool(line.strip())
            continue
        if upto is None or key > tuple(upto) or key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(line)
    if dropped:
        with atomic_open(path) as f:
            f.write("".join(line + "\n" for line in kept))
    return dropped
