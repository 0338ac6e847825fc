"""Optimisers with VAR's weight-decay rule: none on 1-D params, biases, embeddings of position/level, scales."""
from __future__ import annotations

import torch
from torch import nn

_NO_DECAY_KEYS = ("bias", "scale", "pos", "lvl_embed", "level_embed", "start")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (no_decay if p.ndim <= 1 or any(k in leaf for k in _NO_DECAY_KEYS) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    on_cuda = next(model.parameters()).is_cuda
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda or None)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, fused=on_cuda or None)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.0)
    raise ValueError(f"unknown optimizer {kind!r}: use adamw, adam or sgd")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
