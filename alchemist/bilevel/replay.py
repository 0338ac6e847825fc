"""The rater's replay buffer: the last few training batches with the coefficients their step computed.

The rater learns from one noisy coefficient per pair per step, and in a short run sees each pair about
twice; a few extra rater steps on recent batches, with the coefficients as they were computed (stale
by at most ``size`` steps, no extra proxy passes), let it fit that signal instead of trailing it. The
buffer is part of the checkpoint, so a resumed run replays what an uninterrupted one would.
"""
from __future__ import annotations

from collections import deque

import torch

from alchemist.batch import TextFeatures, TokenBatch


class ReplayBuffer:
    def __init__(self, size: int):
        self.items: deque[tuple[TokenBatch, torch.Tensor]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, batch: TokenBatch, a_B: torch.Tensor) -> None:
        self.items.append((batch, a_B.detach()))

    def sample(self) -> tuple[TokenBatch, torch.Tensor]:
        """A uniformly drawn stored step (the global torch RNG, so a resume draws the same)."""
        return self.items[int(torch.randint(len(self.items), ()))]

    def state_dict(self) -> list[dict[str, torch.Tensor | None]]:
        return [{"idx_BL": b.idx_BL.cpu(), "x_BLC": b.x_BLC.cpu(), "hidden_BTD": b.text.hidden_BTD.cpu(),
                 "mask_BT": b.text.mask_BT.cpu(), "pooled_BD": b.text.pooled_BD.cpu(),
                 "final_BlC": None if b.final_BlC is None else b.final_BlC.cpu(), "a_B": a.cpu()}
                for b, a in self.items]

    def load_state_dict(self, state: list[dict[str, torch.Tensor | None]], device: torch.device) -> None:
        self.items.clear()
        for d in state:
            text = TextFeatures(d["hidden_BTD"], d["mask_BT"], d["pooled_BD"])
            batch = TokenBatch(d["idx_BL"], d["x_BLC"], text, d["final_BlC"]).to(device)
            self.items.append((batch, d["a_B"].to(device)))
