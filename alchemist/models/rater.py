"""The rater: the proxy's block design at ``raterDepth``, pooled into one score per pair.

Input = the proxy's teacher-forcing input (start token from the pooled caption, f̂ features of
scales 2..K, cross-attention to the caption) and, with ``full_image`` (the default), the finished f̂
as pn_K² more tokens. The official rater reads the teacher-forcing input alone, which ends one scale
short of the image: the last scale's codes, where noise, blur and fine detail live, never reach it
(on the 4-scale demo they are 64 of 85 tokens). The extra tokens share the scale inputs' projection,
have a level embedding of their own and the last scale's rotary positions. Attention is
bidirectional: the rater judges a finished pair, nothing is predicted, so there is nothing to hide,
and every token sees every other before the mean-pool; it also lets GPU runs use the flash kernel
(no mask).

Two heads (paper §3.3):
- instance head → ``logit_B``, a function of that sample alone: the score used for ranking;
  instance weights softmax_B(sigmoid(logit)).
- group head on (mean_B p, var_B p) → sigmoid → one scalar per batch, multiplying all weights.

A rater distilled with ``bilevel.distill_caption_head`` = "min" carries a third, the caption head
(``add_caption_head``): the instance head then judges the pair as the proxy's signal does, the caption
head whether the caption fits the image, and the logit is the lower of the two (a pair is as good as
the worse of its tests, as in the target it was fitted to). Two heads, so that what teaches the
caption test (a caption that fits is good) cannot raise a pair the other test sinks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from alchemist.batch import TokenBatch
from alchemist.config import ModelConfig
from alchemist.models.blocks import ScaleTransformer, layer_norm


@dataclass
class RaterOutput:
    logit_B: Tensor  # raw instance logit; batch-independent ranking score
    weight_B: Tensor  # W_i = softmax_B(sigmoid(logit))_i · group_scalar (then softmax again if double_softmax)
    group_scalar: Tensor  # 0-dim; 1.0 when the group head is off
    tests_B2: Tensor | None = None  # (instance head, caption head) when the rater has a caption head; logit = min


def score_mlp(in_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 1))


class Rater(ScaleTransformer):
    def __init__(self, depth: int, Cvae: int, patch_nums: Sequence[int], text_dim: int, group_head: bool = True,
                 double_softmax: bool = False, drop_path_rate: float = 0.0, rope_norm: float = 64.0,
                 rope_theta: float = 1e4, mlp_ratio: float = 4.0, full_image: bool = True):
        super().__init__(depth, Cvae, patch_nums, text_dim, causal=False, drop_path_rate=drop_path_rate,
                         rope_norm=rope_norm, rope_theta=rope_theta, mlp_ratio=mlp_ratio)
        self.double_softmax, self.full_image = double_softmax, full_image
        self.instance_head = score_mlp(self.C)
        self.group_head = score_mlp(2 * self.C) if group_head else None
        self.caption_head: nn.Sequential | None = None
        if full_image:
            self.final_embed = nn.Parameter(torch.zeros(1, 1, self.C))
            begin = self.begin_ends[-1][0]
            self.register_buffer("rope_cos_full", torch.cat([self.rope_cos, self.rope_cos[begin:]]), persistent=False)
            self.register_buffer("rope_sin_full", torch.cat([self.rope_sin, self.rope_sin[begin:]]), persistent=False)
        self.init_weights()
        if full_image:
            nn.init.trunc_normal_(self.final_embed, std=(1 / self.C / 3) ** 0.5)

    @classmethod
    def from_config(cls, mcfg: ModelConfig, text_dim: int, double_softmax: bool = False) -> Rater:
        return cls(mcfg.raterDepth, mcfg.Cvae, mcfg.patch_nums, text_dim, group_head=mcfg.group_head,
                   double_softmax=double_softmax, rope_norm=mcfg.rope_norm, rope_theta=mcfg.rope_theta,
                   full_image=mcfg.rater_full_image)

    def add_caption_head(self) -> None:
        """A caption head that starts as a copy of the instance head, so the logit starts as it was."""
        self.caption_head = copy.deepcopy(self.instance_head)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A state with a caption head (a distilled two-test rater) gives this rater one; a state
        without one takes it away."""
        has = any(k.startswith("caption_head.") for k in state_dict)
        if has and self.caption_head is None:
            self.add_caption_head()
        elif not has and self.caption_head is not None:
            self.caption_head = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def pooled(self, batch: TokenBatch) -> Tensor:
        """(B, C) mean over all tokens of the final-normalised states."""
        if not self.full_image:
            return layer_norm(self.features(batch.x_BLC, batch.text)).mean(dim=1).float()
        if batch.final_BlC is None:
            raise ValueError("the rater reads the finished image (model.rater_full_image) but the batch has no "
                             "final_BlC; build batches with alchemist.data.tokens.Featurizer")
        h_BLC = torch.cat([self.embed(batch.x_BLC, batch.text.pooled_BD),
                           self.word_embed(batch.final_BlC) + self.final_embed], dim=1)
        h_BLC = self.trunk(h_BLC, batch.text, self.rope_cos_full, self.rope_sin_full)
        return layer_norm(h_BLC).mean(dim=1).float()

    def forward(self, batch: TokenBatch) -> RaterOutput:
        p_BC = self.pooled(batch)
        with torch.autocast(p_BC.device.type, enabled=False):  # fp32 heads: bf16 scores would tie in a ranking
            return self.heads(p_BC)

    def heads(self, p_BC: Tensor) -> RaterOutput:
        logit_B, tests_B2 = self.instance_head(p_BC).squeeze(-1), None
        if self.caption_head is not None:
            tests_B2 = torch.stack([logit_B, self.caption_head(p_BC).squeeze(-1)], dim=1)
            logit_B = tests_B2.min(dim=1).values
        weight_B = torch.sigmoid(logit_B).softmax(dim=0)
        if self.group_head is None:
            group = torch.ones((), device=p_BC.device)
        else:  # population variance: defined (zero) for a batch of one
            stats_2C = torch.cat([p_BC.mean(dim=0), p_BC.var(dim=0, unbiased=False)])
            group = torch.sigmoid(self.group_head(stats_2C)).squeeze(-1)
        weight_B = weight_B * group
        if self.double_softmax:  # official trainer: softmax over already-normalised weights → ≈ 1/B
            weight_B = weight_B.softmax(dim=0)
        return RaterOutput(logit_B, weight_B, group, tests_B2)


class RaterEnsemble(nn.Module):
    """Raters fitted to one target from one start in different batch orders (``bilevel.distill_fits``),
    scored as one: the mean of their instance logits. Why: the batch order alone moves a fitted rater's
    ranking of a defect by up to 0.18 AUROC (docs/results.md), and the mean of fits keeps what they
    agree on. The fit's targets are standard-normal rank quantiles, so the members' logits share a scale.
    ``official_score`` and the group scalar are the members' means."""

    def __init__(self, members: Sequence[Rater]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 raters, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.text_dim = members[0].text_dim
        self.widths = [m.C for m in members]

    @property
    def blocks(self) -> list[nn.Module]:
        """Every member's blocks (what ``compile_blocks`` compiles)."""
        return [b for m in self.members for b in m.blocks]

    def pooled(self, batch: TokenBatch) -> Tensor:
        """(B, ΣC): the members' pooled features side by side."""
        return torch.cat([m.pooled(batch) for m in self.members], dim=1)

    forward = Rater.forward  # pooled, then the heads in fp32: the same path as one rater's

    def heads(self, p_BC: Tensor) -> RaterOutput:
        outs = [m.heads(p) for m, p in zip(self.members, p_BC.split(self.widths, dim=1))]
        mean = lambda xs: torch.stack(xs).mean(dim=0)  # noqa: E731
        return RaterOutput(mean([o.logit_B for o in outs]), mean([o.weight_B for o in outs]),
                           mean([o.group_scalar for o in outs]))
