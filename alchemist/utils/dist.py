"""Process topology (from accelerate) and gradient averaging that works for every update rule.

Gradients are averaged explicitly after each backward instead of through DDP hooks, because the
estimators also take gradients with ``torch.autograd.grad`` and run extra forward passes, which
DDP's reducer does not see. On one process every function here is a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate import PartialState


@dataclass(frozen=True)
class Topology:
    process_index: int
    num_processes: int
    device: torch.device
    is_main_process: bool


def state() -> Topology:
    """This process's rank, world size and device. accelerate sets up the process group (and picks
    the device) from the launcher's environment; rank and world are read back from torch.distributed
    because PartialState reports a single process for CPU runs started by torchrun."""
    ps = PartialState()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = ps.process_index, ps.num_processes
    return Topology(rank, world, ps.device, rank == 0)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_ranks(ok: bool | torch.Tensor) -> bool:
    """True when ``ok`` holds on every rank (a MIN all-reduce of a flag), so every rank takes the same
    branch: a rank that returned early alone would leave the others' all-reduces without a partner
    (they pair with the wrong step or hang). One host read of the flag; no collective on one process."""
    if not is_dist():
        return bool(ok)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.as_tensor(ok).to(device=device, dtype=torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def average_grads(params) -> None:
    """All-reduce the ``.grad`` of ``params`` to their mean over ranks (one flat buffer per dtype)."""
    if not is_dist():
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in gs:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def average_tensors(tensors: list[torch.Tensor]) -> None:
    """In-place mean over ranks of plain tensors (e.g. a gradient vector from autograd.grad)."""
    if not is_dist():
        return
    for t in tensors:
        dist.all_reduce(t)
        t /= dist.get_world_size()


def broadcast_params(model: torch.nn.Module) -> None:
    """Give every rank rank 0's weights (models are initialised per process)."""
    if not is_dist():
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def replica_spread(model: torch.nn.Module) -> float:
    """Largest difference over ranks of a checksum of the weights: 0.0 when the replicas agree."""
    if not is_dist():
        return 0.0
    s = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    s = s.to(next(model.parameters()).device)
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return float(hi - lo)
