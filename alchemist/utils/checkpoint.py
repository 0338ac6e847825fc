"""Atomic, rotating checkpoints, reading them back (falling back past a damaged one), and the RNG
state (every rank's) needed to resume a run exactly."""
from __future__ import annotations

import hashlib
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from alchemist.utils.dist import is_dist
from alchemist.utils.errors import UserError
from alchemist.utils.io import atomic_torch_save

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")
TRAINING_KEYS = ("step", "epoch", "config")


class CheckpointError(UserError):
    """A file that should be a checkpoint but cannot be read as one."""


def state_sha1(module: torch.nn.Module) -> str:
    """sha1 of a module's state (names and bytes, bit for bit): which weights an output was made with."""
    digest = hashlib.sha1()
    for name, t in module.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, payload: dict[str, Any], keep_last: int) -> Path:
    """Write ``step_XXXXXXXX.pt`` atomically, then drop all but the newest ``keep_last``."""
    path = atomic_torch_save(payload, checkpoint_dir(run_dir) / f"step_{step:08d}.pt")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def torch_load(path: str | Path, what: str = "checkpoint", weights_only: bool = False) -> Any:
    """``torch.load`` on CPU; a missing file is a FileNotFoundError, a truncated or foreign one a
    CheckpointError naming the file and ``what`` it should have been."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # a truncated or foreign file fails anywhere in the zip reader or unpickler
        # (RuntimeError, EOFError, OSError EINVAL, UnpicklingError, KeyError, struct.error, ...)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{str(path)!r} is not a readable {what} ({type(e).__name__}: {first}); "
                              "it is truncated or another kind of file") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (``step_*.pt``); CheckpointError if the file is not one."""
    ckpt = torch_load(path, "training checkpoint")
    if not (isinstance(ckpt, dict) and all(k in ckpt for k in TRAINING_KEYS)):
        raise CheckpointError(f"{str(path)!r} is not a training checkpoint (it lacks {', '.join(TRAINING_KEYS)}); "
                              "pass a checkpoints/step_*.pt file written by a training run")
    return ckpt


def latest_intact_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of a run that loads, with its payload; None when there is none.

    A damaged newer one (truncated by a full disk or a killed copy) is skipped with a warning. When
    every one is damaged that is a CheckpointError: starting over silently would lose the run.
    """
    found = list_checkpoints(run_dir)
    for path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping a damaged checkpoint: %s", e)
    if found:
        raise CheckpointError(f"none of the {len(found)} checkpoints in {str(checkpoint_dir(run_dir))!r} can be read; "
                              "move them away, or set output.resume=none to start the run over")
    return None


def capture_rng() -> dict[str, Any]:
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def gather_rng() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order, on every rank: a collective, so every rank calls it.
    Ranks draw different drop-path masks (seeded ``seed + rank``), so resuming them all from rank 0's
    state would not continue the run."""
    mine = capture_rng()
    if not is_dist():
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def restore_rank_rng(saved: list[dict[str, Any]] | dict[str, Any]) -> bool:
    """Restore this rank's state from ``gather_rng``'s list (an older checkpoint's single state counts
    as one rank's). False, restoring nothing, when it was saved by another number of processes."""
    states = [saved] if isinstance(saved, dict) else list(saved)
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)
    if len(states) != world:
        return False
    restore_rng(states[rank])
    return True
