"""Rater-update rules: the one file to edit to change how the rater learns.

Each rule turns one bilevel step into a loss for the rater. ``ESTIMATORS`` maps the config's
``bilevel.estimator`` name to its class; the trainer builds its rule with ``build_estimator`` and does
not branch on which one is in use (it only asks ``needs_snapshot`` / ``needs_proxy_step`` and calls the
hooks). A new rule is one class here with a ``name`` and the ``@register`` decorator.

A rule whose loss does not need the proxy's new weights (``needs_proxy_step = False``) is evaluated
before the proxy step, so that a non-finite rater loss skips the whole step; anything it changes on
the side (the reference proxy's update) waits for ``commit`` and is dropped by ``discard``.

All rules build a surrogate  Σ_i stopgrad(a_i) · W_i(µ)  whose gradient in µ is the rule's
estimate of ∂L_val/∂µ; they differ in the per-sample coefficient a_i:
- ``penalty``   a_i = l_i(θ)                      (official code, paper Eq. 9)
- ``reference`` a_i = l_i(θ) − l_i(θ̂)             (paper Eq. 6; θ̂ trained on weighted train data)
- ``lookahead`` a_i = ∂L_val(θ')/∂w_i              (the one-step meta-gradient through the proxy's own
                                                   update: γ, the weights' scale and its AdamW step)
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
from alchemist.utils.dist import average_tensors
from alchemist.utils.update import apply_update, discard_update, scaled_backward


@dataclass
class StepContext:
    """What one bilevel step knows when the rater's loss is taken: before the proxy step, or after it
    for rules with ``needs_proxy_step`` (only those see ``theta_before``, ``opt_proxy`` and ``grads``)."""
    proxy: nn.Module
    train: TokenBatch
    val: TokenBatch
    rater_out: RaterOutput  # with grad into the rater
    train_loss_B: torch.Tensor  # l_i(θ) before the proxy step, detached
    weight_B: torch.Tensor  # the detached weights the proxy step used
    theta_before: list[torch.Tensor] | None  # θ before the proxy step, if needs_snapshot
    autocast: Callable[[], object]  # the run's autocast context factory
    gamma: float = 0.0  # the proxy objective: γ·L_val + (1−γ)·train_scale·Σ_i w_i·l_i
    train_scale: float = 1.0  # 1, or 1/B with bilevel.official_scale
    opt_proxy: torch.optim.Optimizer | None = None  # the proxy's optimiser, its state after this step
    grads: list[torch.Tensor | None] | None = None  # the gradient that step used (if needs_snapshot)
    scaler: torch.amp.GradScaler | None = None  # the proxy's loss scaler (fp16), for gradients a rule takes


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
    needs_snapshot = False  # the trainer keeps θ and the proxy step's gradient for the rule
    needs_proxy_step = False  # the rule's loss exists only after the proxy step (else it is taken before)
    # the rule's extra model passes per training image, beyond the step every rule shares (rater
    # forward + backward, proxy forward + backward on the train and val batches); the FLOP model of
    # alchemist/bench reads it: {"proxy_fwd_bwd": n, "proxy_fwd": m}
    extra_passes: dict[str, int] = {}
    center = True
    standardize = False
    entropy_reg = 0.0

    @classmethod
    def from_config(cls, cfg: BilevelConfig, proxy: nn.Module,
                    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], grad_clip: float,
                    make_scaler: Callable[[], torch.amp.GradScaler] | None = None) -> Estimator:
        return cls()

    def rater_loss(self, ctx: StepContext) -> torch.Tensor:
        return self.loss(ctx.rater_out.weight_B, self.targets(ctx))

    def targets(self, ctx: StepContext) -> torch.Tensor:
        """The rule's coefficients after centring / standardising: what the rater's loss weighs, and
        what a replayed step reuses."""
        a_B = self.coefficients(ctx).detach()
        if self.center:
            a_B = a_B - a_B.mean()
        if self.standardize and a_B.numel() > 1:
            a_B = a_B / a_B.std().clamp_min(torch.finfo(a_B.dtype).tiny)
        return a_B

    def loss(self, weight_B: torch.Tensor, a_B: torch.Tensor) -> torch.Tensor:
        """Σ_i W_i·a_i − entropy_reg·entropy(W): its gradient in µ is the rule's estimate of ∂L_val/∂µ."""
        return (weight_B * a_B).sum() - self.entropy_reg * weight_entropy(weight_B)

    def coefficients(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        """Follow the proxy's lr schedule (only rules with a model of their own use it)."""

    def commit(self) -> None:
        """The step is going ahead on every rank: apply what ``rater_loss`` prepared on the side."""

    def discard(self) -> None:
        """The step is skipped on every rank: drop what ``rater_loss`` prepared on the side."""

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
    """Keeps a reference proxy θ̂ trained on the weighted training batches only, with its own optimiser
    and loss scaler (fp16); its update is prepared in ``coefficients`` and applied by ``commit``."""
    name = "reference"
    extra_passes = {"proxy_fwd_bwd": 1}  # the reference proxy's step

    @classmethod
    def from_config(cls, cfg, proxy, make_optimizer, grad_clip, make_scaler=None) -> Estimator:
        return cls(proxy, make_optimizer, grad_clip, make_scaler() if make_scaler else None)

    def __init__(self, proxy: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 grad_clip: float, scaler: torch.amp.GradScaler | None = None):
        self.ref = copy.deepcopy(proxy)
        self.ref.requires_grad_(True)
        self.opt = make_optimizer(self.ref)
        self.grad_clip = grad_clip
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        self.pending = False

    def coefficients(self, ctx: StepContext) -> torch.Tensor:
        self.ref.train()
        with ctx.autocast():
            ref_loss_B = self.ref.per_sample_loss(ctx.train)
        scaled_backward((ctx.weight_B * ref_loss_B).mean(), self.ref, self.opt, self.scaler, self.grad_clip)
        self.pending = True
        return ctx.train_loss_B - ref_loss_B.detach().float()

    def commit(self) -> None:
        if self.pending:
            apply_update(self.opt, self.scaler)
            self.pending = False

    def discard(self) -> None:
        if self.pending:
            discard_update(self.opt, self.scaler)
            self.pending = False

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def state_dict(self) -> dict:
        return {"ref": self.ref.state_dict(), "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ref.load_state_dict(state["ref"])
        self.opt.load_state_dict(state["opt"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


@register
class Lookahead(Estimator):
    """a_i = ∂L_val(θ')/∂w_i for the proxy step the trainer just took, θ' = update(θ, ∇J(θ; w)) with
    J = γ·L_val + (1−γ)·s·Σ_i w_i·l_i. By the chain rule a_i = −(1−γ)·s·∇l_i(θ)·(P ⊙ v) with
    v = ∇L_val(θ') and P = −∂θ'/∂g the update's Jacobian in its gradient g, which for Adam(W) and SGD
    is diagonal (``update_jacobian``). The dot product c_i = ∇l_i(θ)·(P ⊙ v) is a central difference
    along P ⊙ v: two extra forwards (any attention kernel works, no double backward) plus one
    forward/backward for v. The forwards run in eval mode so both sides of the difference see the same
    network (no drop-path noise).

    Exact up to O(ε²) for SGD and Adam(W) steps, with two approximations: gradient clipping's
    factor is treated as a constant (exact when the norm is under ``grad_clip``), and under several
    processes v is averaged like the gradients. At γ = 1 the proxy does not see the weights and
    every a_i is 0: the rater does not learn from that step. Under fp16, v is taken from the loss
    scaled by the proxy's scaler (unscaled after), so small gradients do not flush to zero; an
    overflow makes the rater loss non-finite and the trainer skips the rater's update on every rank.
    """

    name = "lookahead"
    needs_snapshot = True
    needs_proxy_step = True
    extra_passes = {"proxy_fwd_bwd": 1, "proxy_fwd": 2}  # v = ∇L_val(θ'), then l_i(θ ± εPv)

    @classmethod
    def from_config(cls, cfg, proxy, make_optimizer, grad_clip, make_scaler=None) -> Estimator:
        if cfg.fix_proxy:
            raise ConfigError("bilevel.estimator=lookahead differentiates through the proxy's step, and "
                              "bilevel.fix_proxy=true takes none; use penalty or reference with a frozen proxy")
        return cls(cfg.lookahead_eps)

    def __init__(self, eps: float):
        self.eps = eps

    def coefficients(self, ctx: StepContext) -> torch.Tensor:
        scale = (1.0 - ctx.gamma) * ctx.train_scale
        if scale == 0.0:
            return torch.zeros_like(ctx.train_loss_B)
        params = [p for p in ctx.proxy.parameters() if p.requires_grad]
        was_training = ctx.proxy.training
        ctx.proxy.eval()
        with ctx.autocast():
            val_loss = ctx.proxy.per_sample_loss(ctx.val).mean()
        loss_scale = None
        if ctx.scaler is not None:  # fp16: a scaled loss keeps small gradients from flushing to zero
            loss_scale = ctx.scaler.scale(torch.ones((), device=val_loss.device))  # 1 when the scaler is off
            val_loss = ctx.scaler.scale(val_loss)
        v = list(torch.autograd.grad(val_loss, params, allow_unused=True))
        v = [torch.zeros_like(p) if g is None else (g if loss_scale is None else g / loss_scale)
             for g, p in zip(v, params)]
        average_tensors(v)
        jac = update_jacobian(ctx.opt_proxy, params, ctx.grads, ctx.theta_before)
        c_B = alignment(ctx.proxy, params, ctx.theta_before, [j * g for j, g in zip(jac, v)], ctx.train,
                        self.eps, ctx.autocast)
        ctx.proxy.train(was_training)
        return -scale * c_B


@torch.no_grad()
def update_jacobian(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor | None],
                    theta: list[torch.Tensor]) -> list[torch.Tensor]:
    """P = −∂θ'/∂g per coordinate for the step ``opt`` just took with gradient ``grads`` from ``theta``.

    SGD: P = lr. Adam(W), with m, v its moments after the step, t its step count and
    m̂ = m/(1−β1^t), ŝ = √(v/(1−β2^t)):  θ' = θ − lr·m̂/(ŝ+eps) (− AdamW's decay, free of g), so
    P = lr/(ŝ+eps) · [(1−β1)/(1−β1^t) − m̂·(1−β2)·g / ((1−β2^t)·ŝ·(ŝ+eps))]. Adam's coupled weight
    decay feeds g + wd·θ to the moments, so that is the g used.
    """
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = []
    for p, g, t0 in zip(params, grads, theta):
        group, state = group_of[id(p)], opt.state.get(p, {})
        if isinstance(opt, torch.optim.SGD) and not group["momentum"]:
            out.append(torch.full_like(p, group["lr"] if g is not None else 0.0))
            continue
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) or group.get("amsgrad"):
            raise ConfigError("the lookahead rule needs the proxy optimiser to be SGD without momentum, Adam or AdamW "
                             f"(no amsgrad); got {type(opt).__name__}")
        if g is None or not state:
            out.append(torch.zeros_like(p))
            continue
        if not isinstance(opt, torch.optim.AdamW) and group["weight_decay"]:
            g = g + group["weight_decay"] * t0
        b1, b2 = group["betas"]
        t = state["step"]
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":  # the fused optimiser's: no host read
            t = t.to(torch.float64)
            bc1, bc2 = (1 - b1 ** t).to(p.dtype), (1 - b2 ** t).to(p.dtype)
        else:
            bc1, bc2 = 1 - b1 ** float(t), 1 - b2 ** float(t)
        m_hat = state["exp_avg"] / bc1
        s_hat = (state["exp_avg_sq"] / bc2).sqrt()
        den = s_hat + group["eps"]
        curv = torch.where(s_hat > 0, m_hat * (1 - b2) * g / (bc2 * s_hat.clamp_min(1e-38) * den), 0.0)
        out.append(group["lr"] / den * ((1 - b1) / bc1 - curv))
    return out


@torch.no_grad()
def alignment(proxy: nn.Module, params: list[torch.Tensor], theta: list[torch.Tensor], v: list[torch.Tensor],
              batch: TokenBatch, eps: float, autocast: Callable[[], object]) -> torch.Tensor:
    """(l_i(θ+εv) − l_i(θ−εv)) / 2ε with ε = eps/‖v‖; the proxy's params are restored afterwards."""
    current = [p.detach().clone() for p in params]
    v_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in v))
    step = eps / v_norm.clamp_min(1e-12)  # stays on the device: no host read
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
                    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], grad_clip: float,
                    make_scaler: Callable[[], torch.amp.GradScaler] | None = None) -> Estimator:
    """The rule ``cfg.estimator`` names, with the options every rule shares (centring, entropy)."""
    est = estimator_class(cfg.estimator).from_config(cfg, proxy, make_optimizer, grad_clip, make_scaler)
    est.center, est.standardize = cfg.center, cfg.standardize
    est.entropy_reg = cfg.entropy_reg
    return est
