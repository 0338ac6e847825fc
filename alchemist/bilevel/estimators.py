"""Rater-update rules: the one file to edit to change how the rater learns.

Each rule turns one bilevel step into a loss for the rater. ``ESTIMATORS`` maps the config's
``bilevel.estimator`` name to its class; the trainer builds its rule with ``build_estimator`` and does
not branch on which one is in use (it only asks ``needs_snapshot`` and calls the hooks). A new rule
is one class here with a ``name`` and the ``@register`` decorator.

All rules build a surrogate  Σ_i stopgrad(a_i) · W_i(µ)  whose gradient in µ is the rule's
estimate of ∂L_val/∂µ; they differ in the per-sample coefficient a_i:
- ``penalty``   a_i = l_i(θ)                      (official code, paper Eq. 9)
- ``reference`` a_i = l_i(θ) − l_i(θ̂)             (paper Eq. 6; θ̂ trained on weighted train data)
- ``lookahead`` a_i = −η ∇l_i(θ)·∇L_val(θ')        (exact one-step meta-gradient, SGD inner step)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from alchemist.batch import TokenBatch
from alchemist.config import BilevelConfig, ConfigError
from alchemist.models.rater import RaterOutput
from alchemist.utils.dist import average_grads, average_tensors


@dataclass
class StepContext:
    """What one bilevel step knows when the rater is updated (after the proxy step)."""
    proxy: nn.Module
    train: TokenBatch
    val: TokenBatch
    rater_out: RaterOutput  # with grad into the rater
    train_loss_B: torch.Tensor  # l_i(θ) before the proxy step, detached
    weight_B: torch.Tensor  # the detached weights the proxy step used
    theta_before: list[torch.Tensor] | None  # θ before the proxy step, if needs_snapshot
    autocast: Callable[[], object]  # the run's autocast context factory


def weight_entropy(weight_B: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch's weights normalised to sum 1 (the official code's regulariser)."""
    p_B = weight_B.float() / weight_B.float().sum()
    return -(p_B * p_B.clamp_min(1e-12).log()).sum()


class Estimator:
    """``center``: subtract the batch mean from a_i. The instance weights are a softmax, so their
    gradient is unchanged by the shift; but the group scalar g multiplies every weight, and with
    penalty's always-positive a_i = l_i its gradient Σ softmax_i·a_i is always positive: g is driven
    to 0 and takes every instance gradient with it (seen on the demo: g = 0.0024 after 64 steps).
    ``entropy_reg``: the weight of −entropy(W) added to every rule's loss."""
    name = ""  # the config's bilevel.estimator
    needs_snapshot = False
    # the rule's extra model passes per training image, beyond the step every rule shares (rater
    # forward + backward, proxy forward + backward on the train and val batches); the FLOP model of
    # alchemist/bench reads it: {"proxy_fwd_bwd": n, "proxy_fwd": m}
    extra_passes: dict[str, int] = {}
    center = True
    entropy_reg = 0.0

    @classmethod
    def from_config(cls, cfg: BilevelConfig, proxy: nn.Module,
                    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], grad_clip: float) -> Estimator:
        return cls()

    def rater_loss(self, ctx: StepContext) -> torch.Tensor:
        a_B = self.coefficients(ctx)
        if self.center:
            a_B = a_B - a_B.mean()
        loss = (ctx.rater_out.weight_B * a_B).sum()
        return loss - self.entropy_reg * weight_entropy(ctx.rater_out.weight_B)

    def coefficients(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        """Follow the proxy's lr schedule (only rules with a model of their own use it)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


ESTIMATORS: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    ESTIMATORS[cls.name] = cls
    return cls


@register
class Penalty(Estimator):
    name = "penalty"

    def coefficients(self, ctx: StepContext) -> torch.Tensor:
        return ctx.train_loss_B


@register
class Reference(Estimator):
    """Keeps a reference proxy θ̂ trained on the weighted training batches only."""
    name = "reference"
    extra_passes = {"proxy_fwd_bwd": 1}  # the reference proxy's step

    @classmethod
    def from_config(cls, cfg, proxy, make_optimizer, grad_clip) -> Estimator:
        return cls(proxy, make_optimizer, grad_clip)

    def __init__(self, proxy: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 grad_clip: float):
        self.ref = copy.deepcopy(proxy)
        self.ref.requires_grad_(True)
        self.opt = make_optimizer(self.ref)
        self.grad_clip = grad_clip

    def coefficients(self, ctx: StepContext) -> torch.Tensor:
        self.ref.train()
        with ctx.autocast():
            ref_loss_B = self.ref.per_sample_loss(ctx.train)
        (ctx.weight_B * ref_loss_B).mean().backward()
        params = [p for p in self.ref.parameters() if p.grad is not None]
        average_grads(params)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return ctx.train_loss_B - ref_loss_B.detach().float()

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def state_dict(self) -> dict:
        return {"ref": self.ref.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ref.load_state_dict(state["ref"])
        self.opt.load_state_dict(state["opt"])


@register
class Lookahead(Estimator):
    """c_i = ∇l_i(θ)·v with v = ∇L_val(θ'), by a central difference along v.

    Two extra forwards at θ ± εv (any attention kernel works, no double backward) plus one
    forward/backward for v at θ'. The forwards run in eval mode so both sides of the difference
    see the same network (no drop-path noise). With an SGD proxy step θ' = θ − η Σ_i w_i ∇l_i this
    is the exact ∂L_val(θ')/∂w_i = −η c_i up to O(ε²); with AdamW θ' is the real updated proxy.
    """

    name = "lookahead"
    needs_snapshot = True
    extra_passes = {"proxy_fwd_bwd": 1, "proxy_fwd": 2}  # v = ∇L_val(θ'), then l_i(θ ± εv)

    @classmethod
    def from_config(cls, cfg, proxy, make_optimizer, grad_clip) -> Estimator:
        return cls(cfg.lookahead_eta, cfg.lookahead_eps)

    def __init__(self, eta: float, eps: float):
        self.eta, self.eps = eta, eps

    def coefficients(self, ctx: StepContext) -> torch.Tensor:
        params = [p for p in ctx.proxy.parameters() if p.requires_grad]
        was_training = ctx.proxy.training
        ctx.proxy.eval()
        with ctx.autocast():
            val_loss = ctx.proxy.per_sample_loss(ctx.val).mean()
        v = list(torch.autograd.grad(val_loss, params, allow_unused=True))
        v = [torch.zeros_like(p) if g is None else g for g, p in zip(v, params)]
        average_tensors(v)
        c_B = alignment(ctx.proxy, params, ctx.theta_before, v, ctx.train, self.eps, ctx.autocast)
        ctx.proxy.train(was_training)
        return -self.eta * c_B.float()


@torch.no_grad()
def alignment(proxy: nn.Module, params: list[torch.Tensor], theta: list[torch.Tensor], v: list[torch.Tensor],
              batch: TokenBatch, eps: float, autocast: Callable[[], object]) -> torch.Tensor:
    """(l_i(θ+εv) − l_i(θ−εv)) / 2ε with ε = eps/‖v‖; the proxy's params are restored afterwards."""
    current = [p.detach().clone() for p in params]
    v_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in v)).item()
    step = eps / max(v_norm, 1e-12)
    losses = []
    for sign in (1.0, -1.0):
        for p, t, g in zip(params, theta, v):
            p.copy_(t + sign * step * g.to(p.dtype))
        with autocast():
            losses.append(proxy.per_sample_loss(batch))
    for p, c in zip(params, current):
        p.copy_(c)
    return (losses[0] - losses[1]) / (2 * step)  # in the model's dtype: a cast before the difference cancels


def estimator_class(name: str) -> type[Estimator]:
    """The rule registered under ``name``; an unknown name is a ConfigError listing the valid ones."""
    if name not in ESTIMATORS:
        raise ConfigError(f"bilevel.estimator must be one of {', '.join(ESTIMATORS)}, got {name!r}")
    return ESTIMATORS[name]


def build_estimator(cfg: BilevelConfig, proxy: nn.Module,
                    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], grad_clip: float) -> Estimator:
    """The rule ``cfg.estimator`` names, with the options every rule shares (centring, entropy)."""
    est = estimator_class(cfg.estimator).from_config(cfg, proxy, make_optimizer, grad_clip)
    est.center = cfg.center
    est.entropy_reg = cfg.entropy_reg
    return est
