"""One optimiser update that every process takes or skips together, fp16 loss scaling included.

The gradients are averaged over ranks *before* the loss scaler looks for inf/NaN in them. Every rank
then holds the same gradients, reaches the same verdict and moves its scale the same way, so an
overflow on one rank skips the update on all of them. (Checked before the average, the overflowing
rank skipped while the others stepped with the averaged inf/NaN and the replicas parted.) Averaging
the scaled gradients is the same as averaging the unscaled ones: every rank has the same scale.

An update is ``scaled_backward`` then ``apply_update`` or ``discard_update``; the gradient norm stays
on the device (reading it back would stall the launch queue).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from alchemist.utils.dist import average_grads


def scaled_backward(loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    clip: float) -> torch.Tensor:
    """Backward of the scaled loss, gradients averaged over ranks, unscaled and clipped to ``clip``
    (<= 0: no clipping) as the optimiser will see them; their norm before clipping (a device tensor)."""
    scaler.scale(loss).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    average_grads(params)
    scaler.unscale_(opt)
    return torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)


def apply_update(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """The update (skipped by the scaler when the averaged gradients hold inf/NaN), then the
    gradients are cleared."""
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def discard_update(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Drop gradients ``scaled_backward`` made without stepping (another part of the step failed).
    The scaler still closes its round, which its next ``unscale_`` requires."""
    scaler.update()
    opt.zero_grad(set_to_none=True)
