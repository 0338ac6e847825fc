"""Wiring shared by every entry point: process topology, data streams, where to resume from."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from alchemist.config import ConfigError, DataConfig, ModelConfig, OptimConfig, OutputConfig
from alchemist.data.cache import CacheDataset, collate_cache
from alchemist.data.pairs import PairsDataset, collate_pairs
from alchemist.data.sampler import ResumableSampler, Stream
from alchemist.utils.checkpoint import latest_intact_checkpoint, load_checkpoint
from alchemist.utils.dist import state as dist_state


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device
    is_main: bool
    per_rank_bs: int


def setup_runtime(global_bs: int, seed: int) -> Runtime:
    ps = dist_state()
    if global_bs % ps.num_processes:
        raise ConfigError(f"optim.bs {global_bs} must be divisible by the number of processes ({ps.num_processes})")
    torch.manual_seed(seed + ps.process_index)
    if ps.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Runtime(ps.process_index, ps.num_processes, ps.device, ps.is_main_process, global_bs // ps.num_processes)


def amp_dtype(optim: OptimConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``optim.fp16`` asks for on ``device``; None for fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(optim.precision(device.type))


def autocast(dtype: torch.dtype | None, device: torch.device):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def encoder_amp_dtype(model: ModelConfig, optim: OptimConfig, device: torch.device) -> torch.dtype | None:
    """The frozen encoders' autocast dtype: the run's with ``model.encoder_amp``, else None (fp32)."""
    return amp_dtype(optim, device) if model.encoder_amp else None


def make_stream(table, data: DataConfig, split: str, rt: Runtime, *, shuffle: bool, drop_last: bool,
                caption_dropout: float, seed: int) -> Stream:
    """A resumable stream of collated batches over one pairs table: raw images, or the feature
    cache of ``split`` under ``data.cache_dir`` when one is configured."""
    if data.cache_dir:
        dataset = CacheDataset(Path(data.cache_dir) / split, table, caption_dropout=caption_dropout, seed=seed)
        collate = collate_cache
    else:
        dataset = PairsDataset(table, data.image_size, caption_dropout=caption_dropout, seed=seed)
        collate = collate_pairs
    sampler = ResumableSampler(len(dataset), seed=seed, shuffle=shuffle, rank=rt.rank, world=rt.world)
    workers = data.num_workers

    def make_loader(s: ResumableSampler):
        dataset.set_epoch(s.epoch)
        # its own generator: creating a loader must not consume the global RNG (exact resume)
        return DataLoader(dataset, batch_size=rt.per_rank_bs, sampler=s, num_workers=workers, collate_fn=collate,
                          drop_last=drop_last, pin_memory=rt.device.type == "cuda",
                          prefetch_factor=4 if workers else None,
                          generator=torch.Generator().manual_seed(seed + s.epoch))

    return Stream(make_loader, sampler, rt.per_rank_bs)


def resume_checkpoint(out: OutputConfig) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``output.resume`` names, loaded: ``auto`` the run's newest intact one (a
    damaged newer one is skipped with a warning), ``none`` nothing, else that file."""
    if out.resume == "none":
        return None
    if out.resume == "auto":
        return latest_intact_checkpoint(out.run_dir)
    return Path(out.resume), load_checkpoint(out.resume)
