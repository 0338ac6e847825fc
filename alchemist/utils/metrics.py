"""Metrics go to a JSONL file always, and to wandb when enabled (disabled by default)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


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
