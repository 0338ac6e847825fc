"""The two containers that travel between data, proxy, rater and trainer (at the bottom of the
package, beside config.py: data, models and bilevel all import it).

Both are plain dataclasses of tensors with the three operations a trainer needs: move to a
device, take a row subset (per-sample scoring, shuffles, splitting for accumulation) and, for
text, concatenate batches whose captions were padded to different lengths (CFG's doubled batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
import torch.nn.functional as F


@dataclass
class TextFeatures:
    """Frozen text-encoder output: per-token states for cross-attention, one vector for the start token."""
    hidden_BTD: Tensor
    mask_BT: Tensor  # bool, True = real token
    pooled_BD: Tensor

    @property
    def B(self) -> int:
        return self.hidden_BTD.shape[0]

    def to(self, device) -> TextFeatures:
        return TextFeatures(self.hidden_BTD.to(device), self.mask_BT.to(device), self.pooled_BD.to(device))

    def index(self, sel) -> TextFeatures:
        return TextFeatures(self.hidden_BTD[sel], self.mask_BT[sel], self.pooled_BD[sel])

    @staticmethod
    def cat(feats: list[TextFeatures]) -> TextFeatures:
        """Row-wise concatenation; shorter token axes are zero-padded and masked out."""
        T = max(f.hidden_BTD.shape[1] for f in feats)
        hidden = [F.pad(f.hidden_BTD, (0, 0, 0, T - f.hidden_BTD.shape[1])) for f in feats]
        mask = [F.pad(f.mask_BT, (0, T - f.mask_BT.shape[1]), value=False) for f in feats]
        return TextFeatures(torch.cat(hidden), torch.cat(mask), torch.cat([f.pooled_BD for f in feats]))


@dataclass
class TokenBatch:
    """One batch of multi-scale tokens with its captions.

    ``idx_BL``: the ids of all scales concatenated (L = Σ pn²), the proxy's targets.
    ``x_BLC``: the teacher-forcing input (B, L − pn₀², Cvae), f̂ after each scale resized to the next.
    ``final_BlC``: f̂ after the last scale (B, pn_K², Cvae). The teacher-forcing input ends one scale
    short of it, so without it a model of these inputs never sees the finest codes.
    """
    idx_BL: Tensor
    x_BLC: Tensor
    text: TextFeatures
    final_BlC: Tensor | None = None  # the finished f̂ as pn_K² tokens (the rater's view of the last scale)

    @property
    def B(self) -> int:
        return self.idx_BL.shape[0]

    def to(self, device) -> TokenBatch:
        final = None if self.final_BlC is None else self.final_BlC.to(device)
        return TokenBatch(self.idx_BL.to(device), self.x_BLC.to(device), self.text.to(device), final)

    def index(self, sel) -> TokenBatch:
        final = None if self.final_BlC is None else self.final_BlC[sel]
        return TokenBatch(self.idx_BL[sel], self.x_BLC[sel], self.text.index(sel), final)

    @staticmethod
    def cat(batches: list[TokenBatch]) -> TokenBatch:
        """Row-wise concatenation (a table featurised in chunks); captions padded as ``TextFeatures.cat``."""
        finals = [b.final_BlC for b in batches]
        return TokenBatch(torch.cat([b.idx_BL for b in batches]), torch.cat([b.x_BLC for b in batches]),
                          TextFeatures.cat([b.text for b in batches]),
                          None if any(f is None for f in finals) else torch.cat(finals))
