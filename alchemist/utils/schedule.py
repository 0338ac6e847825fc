"""Learning-rate and upper-level-weight schedules (VAR's `lr_wd_annealing` shapes)."""
from __future__ import annotations

import math

# Fraction of the post-warm-up iterations held at the peak before decaying, per schedule.
_HOLD = {"lin0": 0.05, "lin": 0.15}


def warmup_steps(wp: float, ep: int, steps_per_epoch: int) -> int:
    """``optim.wp`` warm-up epochs (<= 0: ep / 50, as VAR) in optimiser steps, at least one."""
    return max(1, round((wp if wp > 0 else ep / 50) * steps_per_epoch))


def lr_factor(sche: str, it: int, warmup_it: int, max_it: int, wp0: float = 0.005, wpe: float = 0.01) -> float:
    """Multiplier of the peak lr at iteration ``it`` (0-based) of ``max_it``.

    Linear warm-up from ``wp0`` over ``warmup_it`` iterations, then: ``const`` stays at 1; ``cos``
    anneals to ``wpe``; ``lin``/``lin0`` hold 15 %/5 % of the rest and decay linearly to ``wpe``.
    """
    if it < warmup_it:
        return wp0 + (1 - wp0) * it / warmup_it
    if sche == "const":
        return 1.0
    done = (it - warmup_it) / max(1, max_it - 1 - warmup_it)
    done = min(1.0, done)
    if sche == "cos":
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * done))
    hold = _HOLD[sche]
    if done < hold:
        return 1.0
    return wpe + (1 - wpe) * (1 - done) / (1 - hold)


def gamma_at(epoch: int, start: float, decay: float, decay_from: int, minimum: float) -> float:
    """Upper-level weight γ: ``start`` until ``decay_from``, then minus ``decay`` per epoch."""
    return max(minimum, start - decay * max(0, epoch - decay_from + 1))
