"""The bilevel loop: zip a validation pass with a cycling training stream; proxy step, rater step.

A step with a non-finite loss is skipped on every rank together (``all_ranks``), before anything is
applied: the proxy loss, and the rater loss of every rule that does not need the proxy's new weights,
are checked first. The lookahead rule's rater loss exists only after the proxy step; when it is
non-finite the proxy's update stays and the rater's is skipped (the step still counts as non-finite).
Progress, metrics, checkpoints and resume come from ``alchemist.loop.TrainLoop``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn

from alchemist.batch import TokenBatch
from alchemist.bilevel.estimators import Estimator, StepContext, build_estimator, weight_entropy
from alchemist.bilevel.replay import ReplayBuffer
from alchemist.config import RaterConfig
from alchemist.data.sampler import Stream
from alchemist.loop import TrainLoop
from alchemist.utils.dist import all_ranks, broadcast_params, replica_spread
from alchemist.utils.metrics import host_floats
from alchemist.utils.optim import build_optimizer, set_lr
from alchemist.utils.schedule import gamma_at


class BilevelTrainer(TrainLoop):
    desc = "bilevel"
    progress_keys = ("L_val", "gamma", "lr", "img_per_s")

    def __init__(self, cfg: RaterConfig, proxy: nn.Module, rater: nn.Module,
                 featurize: Callable[[Any], TokenBatch | None], val: Stream, train: Stream,
                 device: torch.device, is_main: bool = True, on_skipped: Callable[[list], None] = lambda s: None,
                 on_coefficients: Callable[[dict[str, Any]], None] | None = None):
        super().__init__(cfg, featurize, -(-val.sampler.per_rank() // val.batch_size), device, is_main, on_skipped)
        self.proxy, self.rater, self.val, self.train = proxy, rater, val, train
        o = cfg.optim
        make_opt = lambda m, lr, wd: build_optimizer(m, o.opt, lr, wd, (o.beta1, o.beta2))  # noqa: E731
        broadcast_params(proxy), broadcast_params(rater)
        self.proxy.requires_grad_(not cfg.bilevel.fix_proxy)
        self.opt_proxy = None if cfg.bilevel.fix_proxy else make_opt(proxy, o.tlr, o.twd)
        self.opt_rater = make_opt(rater, o.rater_lr, o.rater_wd)
        self.estimator: Estimator = build_estimator(cfg.bilevel, proxy, lambda m: make_opt(m, o.tlr, o.twd),
                                                    o.grad_clip, self.new_scaler)
        self.scalers = [self.new_scaler(), self.new_scaler()]
        self.replay = ReplayBuffer(cfg.bilevel.replay_size)
        self._train_iter = None
        self.on_coefficients, self.train_ids = on_coefficients, []
        # the distillation stage's record, and the rater the loop ended with (bilevel/distill.py)
        self.distilled: dict[str, float] | None = None
        self.rater_online: dict[str, torch.Tensor] | None = None
        self.rater_members: list[dict[str, torch.Tensor]] | None = None  # the ensemble's fits after the first

    def epoch_batches(self) -> Iterator[tuple]:
        """One pass over the validation loader, each batch paired with the next training batch."""
        if self._train_iter is None:
            self._train_iter = self.train.cycle()
        self.val.epoch = self.epoch
        for val_raw in self.val.epoch_batches():
            train_raw = next(self._train_iter)
            self.train_ids = train_raw.get("ids", [])
            yield train_raw, val_raw
        self.val.used = 0

    def train_step(self, train: TokenBatch, val: TokenBatch) -> dict[str, float] | None:
        cfg = self.cfg
        gamma = gamma_at(self.epoch, cfg.bilevel.gamma_start, cfg.bilevel.gamma_decay,
                         cfg.bilevel.gamma_decay_from, cfg.bilevel.gamma_min)
        lr_f = self.lr_factor()
        if self.opt_proxy is not None:
            set_lr(self.opt_proxy, cfg.optim.tlr * lr_f)
        set_lr(self.opt_rater, cfg.optim.rater_lr * self.lr_factor(cfg.optim.rater_sche))
        self.estimator.set_lr(cfg.optim.tlr * lr_f)
        self.proxy.train(), self.rater.train()

        with self.autocast():
            rater_out = self.rater(train)  # once per step: its weights feed both updates
            val_loss_BL = self.proxy.per_token_loss(val)
            train_loss_B = self.proxy.per_sample_loss(train)
        weight_B = rater_out.weight_B.detach().float()
        if not cfg.bilevel.official_scale:
            weight_B = weight_B * train.B
        val_loss = val_loss_BL.float().mean()
        weighted = (weight_B * train_loss_B.float()).mean()
        proxy_loss = gamma * val_loss + (1 - gamma) * weighted
        est = self.estimator
        ctx = StepContext(self.proxy, train, val, rater_out, train_loss_B.detach().float(), weight_B, None,
                          self.autocast, gamma, 1.0 / train.B if cfg.bilevel.official_scale else 1.0,
                          self.opt_proxy, None, self.scalers[0])
        a_B = None if est.needs_proxy_step else est.targets(ctx)
        rater_loss = None if a_B is None else est.loss(rater_out.weight_B, a_B)
        finite = torch.isfinite(proxy_loss)
        if rater_loss is not None:
            finite = finite & torch.isfinite(rater_loss)
        if not all_ranks(finite):  # decided together, before anything is applied
            est.discard()
            return None
        if est.needs_snapshot:
            ctx.theta_before = [p.detach().clone() for p in self.proxy.parameters() if p.requires_grad]
        proxy_gnorm, ctx.grads = self.proxy_step(proxy_loss, keep_grads=est.needs_snapshot)
        if rater_loss is None:
            a_B = est.targets(ctx)
            rater_loss = est.loss(rater_out.weight_B, a_B)
            if not all_ranks(torch.isfinite(rater_loss)):  # the proxy's update stays (module docstring)
                return None
        est.commit()
        rater_gnorm = self.optimizer_step(self.rater, self.opt_rater, rater_loss, self.scalers[1])
        if self.on_coefficients is not None:  # a diagnostic: what this step taught the rater, per pair
            self.on_coefficients({"step": self.step_idx, "gamma": gamma, "ids": list(self.train_ids),
                                  "a": a_B.float().cpu().numpy(), "logit": rater_out.logit_B.detach().float().cpu().numpy()})
        if cfg.bilevel.rater_replay:
            self.replay.add(train, a_B)
            for _ in range(cfg.bilevel.rater_replay):
                batch, a_old = self.replay.sample()
                with self.autocast():
                    weight_B = self.rater(batch).weight_B
                self.optimizer_step(self.rater, self.opt_rater, est.loss(weight_B, a_old), self.scalers[1])

        w = rater_out.weight_B.detach().float()
        per_scale = self.proxy.per_scale_loss(val_loss_BL.detach().float())
        out = {"L_val": val_loss, "weighted_train_loss": weighted, "train_loss": train_loss_B.float().mean(),
               "rater_loss": rater_loss, "gamma": gamma, "lr": cfg.optim.tlr * lr_f, "w_entropy": weight_entropy(w),
               "w_max": w.max(), "w_min": w.min(), "group_scalar": rater_out.group_scalar,
               "proxy_grad_norm": proxy_gnorm, "rater_grad_norm": rater_gnorm}
        out.update({f"L_val_s{i}": v for i, v in enumerate(per_scale.unbind())})
        return host_floats(out)  # one device-to-host copy for all of them

    def proxy_step(self, loss: torch.Tensor, keep_grads: bool = False) -> tuple[torch.Tensor | float, list | None]:
        """One update of the proxy on ``loss`` with its optimiser and scaler: the gradient norm, and
        with ``keep_grads`` a copy of the gradient the update used (the lookahead rule needs it)."""
        if self.opt_proxy is None:
            return 0.0, None
        gnorm = self.backward(self.proxy, self.opt_proxy, loss, self.scalers[0])
        grads = ([None if p.grad is None else p.grad.detach().clone() for p in self.proxy.parameters() if p.requires_grad]
                 if keep_grads else None)
        self.step(self.opt_proxy, self.scalers[0])
        return gnorm, grads

    def plain_proxy_step(self, batch: TokenBatch) -> torch.Tensor | float:
        """A plain (unweighted) proxy step on one batch, in the run's precision: the step a bilevel
        step is compared with (benchmarks, rule comparisons)."""
        with self.autocast():
            loss = self.proxy.per_sample_loss(batch).float().mean()
        return self.proxy_step(loss)[0]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_proxy, self.opt_rater) if o is not None]

    def final_summary(self) -> dict[str, Any]:
        return {"replica_spread": max(replica_spread(self.proxy), replica_spread(self.rater))}

    def extra_state(self) -> dict[str, Any]:
        return {"val_pos": (self.val.epoch, self.val.used), "train_pos": (self.train.epoch, self.train.used),
                "proxy": self.proxy.state_dict(), "rater": self.rater.state_dict(),
                "opt_proxy": None if self.opt_proxy is None else self.opt_proxy.state_dict(),
                "opt_rater": self.opt_rater.state_dict(), "scalers": [s.state_dict() for s in self.scalers],
                "estimator": self.estimator.state_dict(), "replay": self.replay.state_dict(),
                "distilled": self.distilled, "rater_online": self.rater_online,
                "rater_members": self.rater_members}

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        self.proxy.load_state_dict(ckpt["proxy"])
        self.rater.load_state_dict(ckpt["rater"])
        if self.opt_proxy is not None and ckpt["opt_proxy"] is not None:
            self.opt_proxy.load_state_dict(ckpt["opt_proxy"])
        self.opt_rater.load_state_dict(ckpt["opt_rater"])
        for s, st in zip(self.scalers, ckpt["scalers"]):
            s.load_state_dict(st)
        self.estimator.load_state_dict(ckpt["estimator"])
        self.replay.load_state_dict(ckpt.get("replay", []), self.device)
        self.distilled, self.rater_online = ckpt.get("distilled"), ckpt.get("rater_online")
        self.rater_members = ckpt.get("rater_members")
        self.val.epoch, self.val.used = ckpt["val_pos"]
        self.train.epoch, self.train.used = ckpt["train_pos"]
