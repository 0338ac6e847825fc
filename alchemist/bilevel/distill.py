"""Distillation: after the bilevel loop, teach the rater what the final proxy's signal says about every pair.

Why: the per-step signal the rater learns from online is one noisy look at each pair per epoch,
taken by a proxy that is still changing, and the rater integrates all of it, early lessons included
(docs/results.md: at the end of a run the signal ranks noise and blurred pairs at 0.90–1.00 AUROC
while the rater trained on it online ranks them near 0.5). So once the proxy is trained, every
training pair gets one clean coefficient from the final proxy, and the rater is fitted to it.

The coefficient is the lookahead rule's at the final proxy θ, one step ahead:
c_i = ∇l_i(θ)·(P ⊙ v), v = ∇L_val(θ) over the whole validation set, P = 1/(ŝ+eps) the proxy AdamW's
per-coordinate step size without its curvature term (the last step's gradient is gone; the lr and
the (1−γ)·s factor are constants that the rank transform below removes). c_i > 0: a small step on
pair i lowers the validation loss. The rater's logit is regressed on the normal quantile of c's rank
(rank-based: c is heavy-tailed, and only the ranking is used downstream).

Options make the target steadier and let it, and the fit, see wrong captions (docs/bilevel.md,
"Distillation"):
- ``distill_proxy_steps``: a copy of the final proxy takes that many plain steps on the held pairs
  first. The loop's proxy is young (128 steps on the demo) and its signal moves with the seed; a
  longer-trained one ranks the pairs more consistently. The checkpoint's proxy is left as it was.
- ``distill_captions``: the proxy's caption agreement a_i, the share of K other captions under which
  it predicts pair i's image worse than under the pair's own caption (a retrieval rank under the
  proxy's likelihood). The lookahead coefficient barely moves for a wrong caption, because a wrong
  caption touches only the text pathway's share of the gradient; a_i is ~1 for a caption the image
  confirms and ~0.5 for one it does not. The target is then the rank transform of
  min(z(c), z(a)), z the normal quantile of the rank: a pair is as good as the worse of its two tests.
- ``distill_snapshots``: the signal is taken at that many points of the further steps (the loop's
  proxy first, the last one at the end) and the points' rank transforms averaged; the captions are
  dealt out over them. One proxy's signal jumps between nearby checkpoints; their average does not.
- ``distill_swaps``: in the fit, that share of the rows get another row's caption and the target of a
  caption the proxy cannot confirm (``with_swapped_captions``), so that the rater sees far more wrong
  captions than the data holds (off by default: docs/results.md measures what it trades). With the
  judge, the target of the judge's evidence for that caption (``judged_swap_targets``).
- ``distill_caption_head``: the rater gets a second head for the caption test in the fit
  (``Rater.add_caption_head``), fitted to z(a) and to the swapped rows' caption target, so that a lesson
  of the caption test (a caption that fits its image is good) reaches another head than the score
  (``two_test_targets``). "min": the instance head is fitted to z(c) and the score is the lower of the
  two heads, the target's own min rule. "aux": the instance head is fitted to the combined target on
  the rows as they are and the caption head is an auxiliary task of the shared trunk, dropped after
  the fit.
- ``distill_judge_steps``: the caption test is asked of a copy of the loop's proxy trained that many steps
  on the validation pairs (the judge), with every caption at once, and its statistic is the evidence for
  the own caption (``caption_evidence``). The copy trained on the held pairs learns their wrong captions
  with the rest; the judge never sees one.
- ``distill_fits``: that many fits, each from the same start in its own batch order, kept as an ensemble
  whose score is their mean logit (``RaterEnsemble``); ``distill_sche`` = "cos" decays each fit's
  learning rate to 0. Both answer the fit's own variance: one batch order against another moves a
  kind's AUROC by up to 0.18 on one target. Over 3 seeds neither closed the gap to the target, which
  is the fit's bias more than its variance (docs/results.md, "Averaging over fits"), so both are off.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from scipy.special import ndtri
from torch import nn
from tqdm.auto import tqdm

from alchemist.batch import TokenBatch
from alchemist.bilevel.estimators import alignment
from alchemist.config import RaterConfig
from alchemist.models.rater import Rater
from alchemist.runtime import Runtime, make_stream
from alchemist.utils.checkpoint import state_sha1
from alchemist.utils.io import atomic_open
from alchemist.utils.optim import build_optimizer


def adam_step_size(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """1/(ŝ+eps) per coordinate of Adam(W)'s current state (zeros where a parameter has no state)."""
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = []
    for p in params:
        state, group = opt.state.get(p, {}), group_of[id(p)]
        if not state:
            out.append(torch.zeros_like(p))
            continue
        s_hat = (state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))).sqrt()
        out.append(1.0 / (s_hat + group["eps"]))
    return out


def val_gradient(proxy: nn.Module, params: list[torch.Tensor], val: Iterable[TokenBatch],
                 autocast: Callable[[], object]) -> list[torch.Tensor]:
    """∇ of the mean per-sample validation loss over every batch of ``val`` (eval mode)."""
    total = [torch.zeros_like(p) for p in params]
    n = 0
    for batch in val:
        with autocast():
            loss = proxy.per_sample_loss(batch).float().sum()
        for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                t.add_(g)
        n += batch.B
    return [t / max(n, 1) for t in total]


def pair_signal(proxy: nn.Module, opt: torch.optim.Optimizer, val: Iterable[TokenBatch],
                train: Iterable[tuple[list, TokenBatch]], eps: float,
                autocast: Callable[[], object]) -> dict[str, float]:
    """id -> c_i for every (ids, batch) of ``train`` (module docstring); the proxy is left as it was."""
    was_training = proxy.training
    proxy.eval()
    params = [p for p in proxy.parameters() if p.requires_grad]
    v = val_gradient(proxy, params, val, autocast)
    u = [s * g for s, g in zip(adam_step_size(opt, params), v)]
    theta = [p.detach().clone() for p in params]
    out: dict[str, float] = {}
    for ids, batch in train:
        c_B = alignment(proxy, params, theta, u, batch, eps, autocast)
        out.update(zip(map(str, ids), c_B.float().cpu().tolist()))
    proxy.train(was_training)
    return out


def caption_shifts(others: int, snapshots: int, j: int) -> list[int]:
    """The roll offsets 1..``others`` dealt round-robin over ``snapshots`` points: point ``j``'s share, so
    that the points together ask every one of the ``others`` captions once."""
    return list(range(1 + j, others + 1, snapshots))


@torch.no_grad()
def caption_agreement(proxy: nn.Module, train: Iterable[tuple[list, TokenBatch]], shifts: Sequence[int],
                      autocast: Callable[[], object]) -> dict[str, float]:
    """id -> the share of the other captions of its own batch, those ``shifts`` rows on (cyclically; a
    shift of at least the batch size is skipped), under which the proxy's loss on the pair's image is
    higher than under its own caption; 0.5 when none is left. The proxy is left as it was."""
    was_training = proxy.training
    proxy.eval()
    out: dict[str, float] = {}
    for ids, batch in train:
        B, used = batch.B, [r for r in shifts if 0 < r < batch.B]
        with autocast():
            own_B = proxy.per_sample_loss(batch).float()
        wins_B = torch.zeros(B, device=own_B.device)
        for r in used:
            rolled = torch.roll(torch.arange(B, device=own_B.device), r)
            with autocast():
                wins_B += proxy.per_sample_loss(dataclasses.replace(batch, text=batch.text.index(rolled))).float() > own_B
        share_B = wins_B / len(used) if used else torch.full((B,), 0.5, device=own_B.device)
        out.update(zip(map(str, ids), share_B.cpu().tolist()))
    proxy.train(was_training)
    return out


@torch.no_grad()
def caption_evidence(proxy: nn.Module, train: Iterable[tuple[list, TokenBatch]], others: int,
                     autocast: Callable[[], object]) -> dict[str, np.ndarray]:
    """id -> (1 + ``others``,) evidence for each caption asked of the pair's image: log(P(caption | image) /
    P(caption)), the proxy's posterior of that caption among the pair's own (first) and the ``others`` next
    captions of its batch (rolled r = 1..``others`` rows on, cyclically: row i gets row (i - r)'s caption;
    a shift of at least the batch size is skipped and its entry NaN), uniform prior, each caption's
    likelihood the image's total token likelihood under it. The own caption's entry is 0 when no other
    caption is left (no evidence either way), ~log(n) for a caption that alone explains its image, very
    negative when another one explains it much better. Why not the share of wins (``caption_agreement``):
    it counts a caption that loses by a token as one that loses by the whole image. The others' entries
    grade the swapped captions of the fit (``judged_swap_targets``). The proxy is left as it was."""
    was_training = proxy.training
    proxy.eval()
    out: dict[str, np.ndarray] = {}
    for ids, batch in train:
        B = batch.B
        shifts = [r for r in range(others + 1) if r < B]
        nll_BN = torch.zeros(B, len(shifts), dtype=torch.float64, device=batch.idx_BL.device)  # totals of ~L nats
        for n, r in enumerate(shifts):
            rows = torch.roll(torch.arange(B, device=nll_BN.device), r)
            shown = batch if r == 0 else dataclasses.replace(batch, text=batch.text.index(rows))
            with autocast():
                nll_BN[:, n] = proxy.per_token_loss(shown).double().sum(dim=1)
        evidence_BN = -nll_BN - torch.logsumexp(-nll_BN, dim=1, keepdim=True) + np.log(len(shifts))
        padded = np.full((B, others + 1), np.nan)
        padded[:, :len(shifts)] = evidence_BN.cpu().numpy()
        out.update(zip(map(str, ids), padded))
    proxy.train(was_training)
    return out


def judge_evidence(proxy: nn.Module, opt: torch.optim.Optimizer, val: list[TokenBatch],
                   held: list[tuple[list, TokenBatch]], steps: int, captions: int, lr: float,
                   make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                   step: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], object],
                   autocast: Callable[[], object], seed: int, progress: bool = True) -> dict[str, np.ndarray]:
    """``caption_evidence`` of the held pairs asked of the judge: a copy of ``proxy`` trained ``steps``
    plain steps on the validation batches (``trained_further``), which holds no wrong caption. Why not
    the copy trained on the held pairs: it learns their wrong captions along with the right ones, and
    its test gets worse the longer it trains (docs/results.md). The originals are untouched."""
    judge, _ = trained_further(proxy, opt, _shuffled_cycle(val, seed), steps, lr, make_optimizer, step, autocast,
                               progress)
    return caption_evidence(judge, tqdm(held, desc="distill judge", disable=not progress, dynamic_ncols=True),
                            captions, autocast)


def twin_of(proxy: nn.Module, opt: torch.optim.Optimizer, lr: float,
            make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A copy of ``proxy`` in train mode and an optimiser for it that carries on ``opt``'s state at ``lr``."""
    twin = copy.deepcopy(proxy).train()
    twin_opt = make_optimizer(twin)
    # its moments carry on (copied: loading shares the tensors, and Adam updates them in place)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for group in twin_opt.param_groups:
        group["lr"] = lr
    return twin, twin_opt


def plain_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[TokenBatch], steps: int,
                step: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], object],
                autocast: Callable[[], object], progress: bool = True) -> None:
    """``steps`` plain (unweighted) updates of ``model`` in place on ``batches``; ``step(model, opt, loss)``
    applies one."""
    it = iter(batches)
    for _ in tqdm(range(steps), desc="distill proxy", disable=not progress, dynamic_ncols=True):
        with autocast():
            loss = model.per_sample_loss(next(it)).float().mean()
        step(model, opt, loss)


def trained_further(proxy: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[TokenBatch], steps: int,
                    lr: float, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                    step: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], object],
                    autocast: Callable[[], object], progress: bool = True) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A copy of ``proxy`` and of its optimiser's state after ``steps`` plain (unweighted) steps at
    ``lr`` on ``batches``; ``step(model, opt, loss)`` applies one update. The originals are untouched."""
    twin, twin_opt = twin_of(proxy, opt, lr, make_optimizer)
    plain_steps(twin, twin_opt, batches, steps, step, autocast, progress)
    return twin, twin_opt


def snapshot_signals(proxy: nn.Module, opt: torch.optim.Optimizer, held: list[tuple[list, TokenBatch]],
                     val: list[TokenBatch], further: Iterator[TokenBatch], points: Sequence[int], captions: int,
                     eps: float, lr: float, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                     step: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], object],
                     autocast: Callable[[], object], progress: bool = True
                     ) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """The held pairs' ids, their ``pair_signal`` at each of ``points`` (plain steps of one copy of
    ``proxy`` on ``further``, see ``trained_further``) and their caption agreement at each point that
    was dealt captions (``caption_shifts``), in the ids' order. The originals are untouched."""
    signals, agreements, done = [], [], 0
    for j, point in enumerate(points):
        if point > done:
            if not done:  # one copy, trained on from point to point
                proxy, opt = twin_of(proxy, opt, lr, make_optimizer)
            plain_steps(proxy, opt, further, point - done, step, autocast, progress)
            done = point
        desc = lambda what: f"distill {what} {j + 1}/{len(points)}"  # noqa: E731
        signal = pair_signal(proxy, opt, val, tqdm(held, desc=desc("signal"), disable=not progress,
                                                   dynamic_ncols=True), eps, autocast)
        ids = list(signal)
        signals.append(np.array([signal[i] for i in ids]))
        if shifts := caption_shifts(captions, len(points), j):
            a = caption_agreement(proxy, tqdm(held, desc=desc("captions"), disable=not progress, dynamic_ncols=True),
                                  shifts, autocast)
            agreements.append(np.array([a[i] for i in ids]))
    return ids, signals, agreements


def combined_target(c: np.ndarray, a: np.ndarray | None) -> np.ndarray:
    """``rank_target(c)``, or with caption agreement ``a`` the rank target of min(z(c), z(a))."""
    return rank_target(c) if a is None else rank_target(np.minimum(rank_target(c), rank_target(a)))


def quantile_in(ref: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The standard-normal quantile of each value of ``x``'s mean rank among ``ref`` (1-based, ties
    sharing theirs; a value not in ``ref`` ranks half-way between its neighbours), over len(ref) + 1."""
    s = np.sort(ref)
    below, upto = np.searchsorted(s, x, "left"), np.searchsorted(s, x, "right")
    return ndtri((below + (upto - below + 1) / 2) / (len(ref) + 1))


def swapped_target(c: np.ndarray, a: np.ndarray, chance: float = 0.5) -> np.ndarray:
    """Each pair's image under a caption the proxy cannot confirm (agreement ``chance``, what an unrelated
    caption scores), on the scale of ``combined_target(c, a)``: its own min(z(c), z(a)) capped at
    z(chance), placed among the pairs' own. Never above the pair's own target: a low a_i can be the
    image's fault (no caption predicts a noise image), and another caption does not mend the image."""
    own = np.minimum(rank_target(c), rank_target(a))
    return quantile_in(own, np.minimum(own, quantile_in(a, np.array([chance]))))


def judged_swap_targets(c: np.ndarray, evidence_NK: np.ndarray) -> np.ndarray:
    """(N, K - 1) targets of each pair's image under the caption r = 1..K - 1 rows back (column r - 1), on the
    scale of ``combined_target(c, evidence_NK[:, 0])``: min(z(c), the evidence for that caption placed
    among the pairs' own evidence), placed among the pairs' own values. ``evidence_NK``: the judge's
    ``caption_evidence``, own caption first; NaN where it did not ask (and then NaN: no loss). Why not
    ``swapped_target``'s chance level: the judge says how well each caption fits, so a swapped caption
    that happens to fit (the same digit) is taught as fitting, and one under which the image is a
    misfit is taught as worse than a caption that merely says nothing."""
    own, others = evidence_NK[:, 0], evidence_NK[:, 1:]
    zc = rank_target(c)
    asked = ~np.isnan(others)
    out = np.full(others.shape, np.nan)
    judged = np.minimum(np.broadcast_to(zc[:, None], others.shape)[asked], quantile_in(own, others[asked]))
    out[asked] = quantile_in(np.minimum(zc, rank_target(own)), judged)
    return out


def two_test_targets(c: np.ndarray, a: np.ndarray, aux: bool = False,
                     chance: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) targets of (instance head, caption head) for each pair as it is and for its image under a
    swapped caption. The caption head: z(a), and min(z(a), z(``chance``)) when swapped. The instance
    head: z(c) under any caption (it is to judge the pair as the signal does, which barely depends on
    the caption, and leave the caption to the other head); with ``aux`` the combined target on the
    rows as they are and NaN (no loss) when swapped, so the score never learns that a caption which
    fits is good."""
    zc, za = rank_target(c), rank_target(a)
    swapped_a = np.minimum(za, quantile_in(a, np.array([chance])))
    if aux:
        return np.stack([combined_target(c, a), za], axis=1), np.stack([np.full_like(zc, np.nan), swapped_a], axis=1)
    return np.stack([zc, za], axis=1), np.stack([zc, swapped_a], axis=1)


def with_swapped_captions(batches: Iterable[tuple[TokenBatch, torch.Tensor, torch.Tensor]], share: float,
                          seed: int) -> Iterator[tuple[TokenBatch, torch.Tensor]]:
    """Each (batch, target_B, swapped_B) as (batch, target_B) with about ``share`` of its rows given the
    caption of the row a random shift on (one shift per batch, never 0) and their row of ``swapped_B``
    (``swapped_target``, or ``two_test_targets``' second table for a (B, 2) target; not capped by the
    target of the pair the caption came from: that target mostly judges its image). A (B, K) table for a
    (B,) target is the judge's (``judged_swap_targets``): the rows get the caption r rows back, r drawn
    from 1..min(K, B - 1), and column r - 1.
    Why: the planted wrong captions are a few per cent of the pairs, too few for the rater to learn
    caption–image agreement from; every other caption of a batch is a wrong caption for free."""
    rng = np.random.default_rng(seed)
    for batch, target_B, swapped_B in batches:
        B = batch.B
        rows = rng.random(B) < share if B > 1 else np.zeros(B, bool)
        if not rows.any():
            yield batch, target_B
            continue
        src = np.arange(B)
        if swapped_B.dim() > target_B.dim():  # the judge's table: one column per caption it asked
            r = int(rng.integers(1, min(swapped_B.shape[1], B - 1) + 1))
            src[rows], swapped_B = (src[rows] - r) % B, swapped_B[:, r - 1]
        else:
            src[rows] = (src[rows] + rng.integers(1, B)) % B
        rows_B, src_B = torch.as_tensor(rows, device=target_B.device), torch.as_tensor(src, device=target_B.device)
        yield (dataclasses.replace(batch, text=batch.text.index(src_B)),
               torch.where(rows_B.view(-1, *[1] * (target_B.dim() - 1)), swapped_B, target_B))


def snapshot_points(steps: int, snapshots: int) -> list[int]:
    """After how many further proxy steps the signal is taken: the end alone, or ``snapshots`` points
    evenly spaced from the loop's own proxy (0) to ``steps``."""
    return [steps] if snapshots == 1 else np.linspace(0, steps, snapshots).round().astype(int).tolist()


def mean_rank(signals: Sequence[np.ndarray]) -> np.ndarray:
    """The mean over snapshots of each one's ``rank_target``: every snapshot votes with equal weight,
    whatever the scale of its coefficients."""
    return np.mean([rank_target(c) for c in signals], axis=0)


def rank_target(c: np.ndarray) -> np.ndarray:
    """The standard-normal quantile of each value's rank (ties share their mean rank)."""
    return quantile_in(c, c)


def distill_loss(logit_B: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the instance logit (B,), or of both heads' (B, 2), to its target, over the
    targets that are not NaN."""
    known_B = ~target_B.isnan()
    err_B = (logit_B.float() - torch.where(known_B, target_B, logit_B.detach().float())).pow(2)
    return err_B.sum() / known_B.sum().clamp(min=1)


def fit_rater(rater: nn.Module, step: Callable[[torch.Tensor], object],
              batches: Iterable[tuple[TokenBatch, torch.Tensor]], steps: int, autocast: Callable[[], object],
              progress: bool = True) -> list[float]:
    """``steps`` updates of the rater's logit towards each batch's target (from ``batches``, cycled by
    the caller), or of both heads' (``tests_B2``) for a (B, 2) target; ``step(loss)`` applies one
    optimiser update. Returns each step's loss."""
    rater.train()
    losses = []
    it = iter(batches)
    for _ in tqdm(range(steps), desc="distill", disable=not progress, dynamic_ncols=True):
        batch, target_B = next(it)
        with autocast():
            out = rater(batch)
        loss = distill_loss(out.logit_B if target_B.dim() == 1 else out.tests_B2, target_B)
        step(loss)
        losses.append(float(loss.detach()))
    return losses


TARGET_FILE = "distill_target.parquet"
JUDGE_FILE = "distill_judge.parquet"  # the judge's evidence for every caption it asked


def target_key(cfg: RaterConfig, trainer: Any) -> dict[str, float | str]:
    """What the target depends on: the loop's proxy (its step and weights) and the signal's settings
    (not the fit's)."""
    b = cfg.bilevel
    key = {"loop_step": trainer.step_idx, "proxy": state_sha1(trainer.proxy), "seed": cfg.seed,
           "distill_pairs": b.distill_pairs,
           "distill_proxy_steps": b.distill_proxy_steps, "distill_captions": b.distill_captions,
           "distill_snapshots": b.distill_snapshots, "lookahead_eps": b.lookahead_eps}
    # only when set, so that the targets saved before the judge existed still match their settings
    return {**key, "distill_judge_steps": b.distill_judge_steps} if b.distill_judge_steps else key


def write_target(path: Path, table: pd.DataFrame, key: dict[str, float | str]) -> None:
    """The per-pair target (id, signal, agreement, target) with its ``target_key`` in the file's metadata."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"alchemist": json.dumps(key).encode()})
    with atomic_open(path, "wb") as f:
        pq.write_table(arrow, f)


def read_target(path: Path, key: dict[str, float | str]) -> pd.DataFrame | None:
    """The saved target when it was computed with ``key``, else None."""
    if not path.is_file():
        return None
    table = pq.read_table(path)
    saved = (table.schema.metadata or {}).get(b"alchemist")
    return table.to_pandas() if saved is not None and json.loads(saved) == key else None


def distill_settings(cfg: RaterConfig) -> dict[str, float]:
    """What the stage's result depends on beyond the checkpoint: a rerun with other values redoes it."""
    b = cfg.bilevel
    return {"distill_steps": b.distill_steps, "distill_lr": b.distill_lr, "distill_pairs": b.distill_pairs,
            "distill_proxy_steps": b.distill_proxy_steps, "distill_captions": b.distill_captions,
            "distill_snapshots": b.distill_snapshots, "distill_swaps": b.distill_swaps,
            "distill_caption_head": b.distill_caption_head, "distill_judge_steps": b.distill_judge_steps,
            "distill_start": b.distill_start, "distill_fits": b.distill_fits, "distill_sche": b.distill_sche}


def needs_distillation(cfg: RaterConfig, distilled: dict | None) -> bool:
    """The stage is asked for and was not done with these settings."""
    settings, default = distill_settings(cfg), distill_settings(RaterConfig())
    return bool(cfg.bilevel.distill_steps) and (distilled is None or  # a setting newer than the run: its default
                                                 any(distilled.get(k, default[k]) != v for k, v in settings.items()))


def fresh_rater_state(cfg: RaterConfig, text_dim: int) -> dict[str, torch.Tensor]:
    """The weights of a newly initialised rater of ``cfg``, seeded by ``cfg.seed`` + 6 (the global RNG is
    left as it was). Why a fit may start there (``distill_start``): the loop's rater was trained on
    another signal and can start the fit far from the target's scale; over 3 seeds the fresh start did
    worse all the same (docs/results.md), so it is not the default."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 6)
        return Rater.from_config(cfg.model, text_dim, double_softmax=cfg.bilevel.double_softmax).state_dict()


def run_distillation(cfg: RaterConfig, trainer: Any, train_table: pd.DataFrame, val_table: pd.DataFrame,
                     rt: Runtime) -> dict[str, float]:
    """The stage ``train_rater`` runs after the bilevel loop when ``bilevel.distill_steps`` > 0: the
    final proxy's signal for ``bilevel.distill_pairs`` training pairs drawn at random (all of a
    smaller table), held featurised in memory, and the rater fitted to it on them, starting from the
    rater the loop ended with (kept in the checkpoint as ``rater_online``) or, with ``distill_start`` =
    "fresh", from a newly initialised one (``fresh_rater_state``); a checkpoint marked
    ``distilled`` with the settings (a rerun with the same ones skips the stage). ``trainer``: the
    ``BilevelTrainer`` after its loop. Every process computes the same signal and takes the same
    steps on the same batches, so the replicas stay equal without communication. The per-pair target
    is kept in the run folder (``TARGET_FILE``): to compare the rater with what it was taught, and so
    that a redo with other fit settings (``distill_steps``, ``distill_lr``) skips the signal."""
    t0 = time.perf_counter()
    if trainer.rater_online is None:
        trainer.rater_online = _state_copy(trainer.rater)
    else:  # a redo with other settings starts from the rater the loop ended with
        trainer.rater.load_state_dict(trainer.rater_online)
    if cfg.bilevel.distill_start == "fresh":  # the group head, which the fit does not train, stays the loop's
        fresh = fresh_rater_state(cfg, trainer.rater.text_proj.in_features)
        trainer.rater.load_state_dict({k: trainer.rater_online[k] if k.startswith("group_head.") else v
                                       for k, v in fresh.items()})
    if cfg.bilevel.distill_caption_head:
        trainer.rater.add_caption_head()
    progress = trainer.is_main and cfg.logging.progress
    one = dataclasses.replace(rt, rank=0, world=1)
    stream = lambda table, split, shuffle, seed: make_stream(  # noqa: E731
        table, cfg.data, split, one, shuffle=shuffle, drop_last=False, caption_dropout=0.0, seed=seed)

    def featurized(raws):
        for raw in raws:
            batch = trainer.featurize(raw)
            if batch is not None and batch.B:
                yield raw["ids"], batch

    val_batches = [b for _, b in featurized(stream(val_table, "val", False, cfg.seed).epoch_batches())]
    held = list(_first_pairs(featurized(stream(train_table, "train", True, cfg.seed + 2).epoch_batches()),
                             cfg.bilevel.distill_pairs))
    o, b = cfg.optim, cfg.bilevel
    path, key = cfg.output.run_dir / TARGET_FILE, target_key(cfg, trainer)
    scaler = trainer.new_scaler()
    make_opt = lambda m: build_optimizer(m, o.opt, o.tlr, o.twd, (o.beta1, o.beta2))  # noqa: E731
    proxy_step = lambda m, opt, loss: trainer.optimizer_step(m, opt, loss, scaler)  # noqa: E731

    @functools.cache  # once per stage: the target and the swaps both ask, and only the main rank saves it
    def judge_table() -> pd.DataFrame:
        """The judge's (N, 1 + K) evidence by id, kept beside the target (``JUDGE_FILE``)."""
        judge_path = cfg.output.run_dir / JUDGE_FILE
        saved = read_target(judge_path, key)
        if saved is None:
            evidence = judge_evidence(trainer.proxy, trainer.opt_proxy, val_batches, held, b.distill_judge_steps,
                                      b.distill_captions, o.tlr, make_opt, proxy_step, trainer.autocast,
                                      cfg.seed + 5, progress)
            saved = pd.DataFrame(np.stack(list(evidence.values())),
                                 columns=[f"evidence_{r}" for r in range(b.distill_captions + 1)])
            saved.insert(0, "id", list(evidence))
            if trainer.is_main:
                write_target(judge_path, saved, key)
        return saved.set_index("id")

    judged = lambda ids: judge_table().loc[ids].to_numpy()  # noqa: E731  (in ``ids``' order)

    table = read_target(path, key)  # a redo with other fit settings only: the signal is as it was
    if table is None:
        ids, signals, agreements = snapshot_signals(
            trainer.proxy, trainer.opt_proxy, held, val_batches,
            (batch for _, batch in _shuffled_cycle(held, cfg.seed + 3)),
            snapshot_points(b.distill_proxy_steps, b.distill_snapshots),
            0 if b.distill_judge_steps else b.distill_captions, b.lookahead_eps, o.tlr, make_opt, proxy_step,
            trainer.autocast, progress)
        signal, agreement = mean_rank(signals), np.mean(agreements, axis=0) if agreements else None
        if b.distill_judge_steps:
            agreement = judged(ids)[:, 0]
        table = pd.DataFrame({"id": ids, "signal": signal, "agreement": np.nan if agreement is None else agreement,
                              "target": combined_target(signal, agreement)})
        if trainer.is_main:
            write_target(path, table, key)
    ids, c, a = table["id"].tolist(), table["signal"].to_numpy(), table["agreement"].to_numpy()
    if b.distill_caption_head:
        target, swapped = (dict(zip(ids, t)) for t in two_test_targets(c, a, aux=b.distill_caption_head == "aux"))
    else:
        target = dict(zip(ids, table["target"].to_numpy()))
        if b.distill_swaps:
            swapped = dict(zip(ids, judged_swap_targets(c, judged(ids)) if b.distill_judge_steps
                               else swapped_target(c, a)))
        else:
            swapped = target
    as_tensor = lambda values, batch_ids, batch: torch.tensor(  # noqa: E731
        np.array([values[str(i)] for i in batch_ids]), dtype=torch.float32, device=batch.idx_BL.device)
    fitted = [(batch, as_tensor(target, batch_ids, batch), as_tensor(swapped, batch_ids, batch))
              for batch_ids, batch in held]
    start = _state_copy(trainer.rater)
    members, losses = [], []
    for k in range(b.distill_fits):  # member 0 takes the batch order a single fit takes
        trainer.rater.load_state_dict(start)
        losses.append(_fit_member(cfg, trainer, fitted, fit_seed(cfg.seed, k), progress))
        members.append(_state_copy(trainer.rater))
    trainer.rater.load_state_dict(members[0])
    trainer.rater_members = members[1:] or None
    trainer.rater.eval()
    nan = float("nan")
    trainer.distilled = {**distill_settings(cfg), "pairs": len(ids), "steps_taken": sum(map(len, losses)),
                         "loss_first": losses[0][0] if losses[0] else nan,
                         "loss_last": float(np.mean([m[-10:] for m in losses])) if losses[0] else nan,  # of all fits
                         "seconds": time.perf_counter() - t0}
    trainer.save()
    return {(k if k.startswith("distill_") else f"distill_{k}"): v for k, v in trainer.distilled.items()}


def fit_seed(seed: int, k: int) -> int:
    """The batch order's seed of fit ``k`` (its swaps take this + 4): ``seed`` for the first, as a single
    fit has it, then steps of 10, clear of the stage's other seeds (seed + 1 ... + 6)."""
    return seed + 10 * k


def fit_lr_factor(sche: str, steps: int) -> Callable[[int], float]:
    """The fit's learning-rate factor after ``t`` updates: 1 ("const"), or a cosine from 1 to 0 ("cos")."""
    if sche == "cos":
        return lambda t: float(0.5 * (1 + np.cos(np.pi * min(t, steps) / max(steps, 1))))
    return lambda t: 1.0


def _fit_member(cfg: RaterConfig, trainer: Any, fitted: list, seed: int, progress: bool) -> list[float]:
    """One fit of ``trainer.rater`` (from where it is) to ``fitted``'s targets, in the order of ``seed``,
    with a new optimiser; the caption head of "aux" dropped after it. Returns each step's loss."""
    o, b = cfg.optim, cfg.bilevel
    opt = build_optimizer(trainer.rater, o.opt, b.distill_lr or o.rater_lr, o.rater_wd, (o.beta1, o.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fit_lr_factor(b.distill_sche, b.distill_steps))
    scaler = trainer.new_scaler()

    def step(loss: torch.Tensor) -> None:
        trainer.optimizer_step(trainer.rater, opt, loss, scaler)
        sched.step()

    losses = fit_rater(trainer.rater, step, with_swapped_captions(_shuffled_cycle(fitted, seed), b.distill_swaps,
                                                                  seed + 4), b.distill_steps, trainer.autocast, progress)
    if b.distill_caption_head == "aux":  # it taught the trunk; the score is the instance head's
        trainer.rater.caption_head = None
    return losses


def undo_distillation(trainer: Any) -> None:
    """Back to the rater the loop ended with (a rerun with ``bilevel.distill_steps`` = 0)."""
    trainer.rater.load_state_dict(trainer.rater_online)
    trainer.distilled = trainer.rater_online = trainer.rater_members = None
    trainer.save()


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights, which later steps on ``model`` leave as they are."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _first_pairs(batches: Iterable[tuple[list, TokenBatch]], n: int) -> Iterator[tuple[list, TokenBatch]]:
    """The batches up to ``n`` pairs in all (the last one cut)."""
    left = n
    for ids, batch in batches:
        if left <= 0:
            return
        if batch.B > left:
            ids, batch = ids[:left], batch.index(slice(0, left))
        left -= batch.B
        yield ids, batch


def _shuffled_cycle(held: list, seed: int) -> Iterator:
    """``held`` over and over, each pass in a new random order."""
    rng = np.random.default_rng(seed)
    while True:
        for j in rng.permutation(len(held)):
            yield held[j]
