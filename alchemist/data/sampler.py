"""A sharded, seeded sampler that can start mid-epoch, so a resumed run sees the same batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """DistributedSampler-like: each epoch a seeded permutation, padded to a multiple of ``world``,
    strided over ranks; ``start`` skips the first samples of this rank's share (resume)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1,
                 drop_last: bool = False):
        if n <= 0:
            raise ValueError("ResumableSampler needs at least one sample")
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.drop_last = drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return self.n // self.world if self.drop_last else -(-self.n // self.world)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank() * self.world
        order = (order * (total // self.n + 1))[:total]
        return order[self.rank:total:self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.per_rank() - self.start


@dataclass
class Stream:
    """A loader over a resumable sampler that knows how many samples of the epoch it has used."""
    make_loader: Callable[[Any], Iterator]  # sampler -> iterable of raw batches
    sampler: Any  # alchemist.data.sampler.ResumableSampler
    batch_size: int
    epoch: int = 0
    used: int = 0

    def epoch_batches(self) -> Iterator:
        self.sampler.set_epoch(self.epoch, self.used)
        for raw in self.make_loader(self.sampler):
            self.used = min(self.used + self.batch_size, self.sampler.per_rank())
            yield raw

    def cycle(self) -> Iterator:
        while True:
            yield from self.epoch_batches()
            self.epoch, self.used = self.epoch + 1, 0
