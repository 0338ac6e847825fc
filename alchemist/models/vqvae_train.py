"""Training a small VAR-style tokenizer from scratch (no pretrained weights exist offline).

Loss = reconstruction (L2 or L1) + VQ loss (VAR's β-weighted commitment / codebook terms, straight-
through). Codes unused for `dead_after` steps (and, after the first step, codes never used) are
re-initialised from vectors the quantiser saw in the current batch: without it a randomly
initialised codebook collapses onto a handful of codes.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from alchemist.models.vqvae import VQVAE
from alchemist.utils.errors import UserError
from alchemist.utils.io import atomic_torch_save

log = logging.getLogger(__name__)


def _cycle(images: Iterable) -> Iterator[torch.Tensor]:
    """Endless stream of B3HW batches from tensors or `collate_pairs` dicts, re-iterating each epoch."""
    while True:
        n = 0
        for batch in images:
            n += 1
            yield batch["img_B3HW"] if isinstance(batch, dict) else batch
        if n == 0:
            raise ValueError("the image source yielded no batches (an exhausted iterator? pass a list or a DataLoader)")


def _restart_dead_codes(model: VQVAE, optim: torch.optim.Optimizer, dead_V: torch.Tensor, z_NC: torch.Tensor,
                        gen: torch.Generator) -> int:
    """Overwrite dead codes with random quantised vectors of this batch; clear their Adam moments."""
    n = int(dead_V.sum())
    if n == 0:
        return 0
    weight = model.quantize.embedding.weight
    donors = z_NC[torch.randint(len(z_NC), (n,), generator=gen).to(z_NC.device)]
    with torch.no_grad():
        weight[dead_V] = donors.to(weight.dtype)
    for moment in optim.state.get(weight, {}).values():
        if torch.is_tensor(moment) and moment.shape == weight.shape:
            moment[dead_V] = 0
    return n


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    return min(1.0, (step + 1) / max(1, warmup)) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / steps))))


def train_vqvae(model: VQVAE, images: Iterable, steps: int, lr: float = 1e-3, device: str | torch.device = "cpu",
                log_every: int = 50, out_path: str | Path | None = None, *, recon: str = "l2",
                restart_dead: bool = True, dead_after: int = 20, restart_every: int = 10, warmup: int = 20,
                grad_clip: float = 1.0, save_every: int = 200, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train `model` in place for `steps` optimiser steps; returns stats (and checkpoints if `out_path`).

    Usage and perplexity are measured over the codes hit in the last `log_every` steps (all scales).
    The final checkpoint is ``{"state_dict", "config", "stats"}``, which `load_vqvae` reads without
    kwargs. Every `save_every` steps a checkpoint that also holds the training state is written to the
    same path; a rerun resumes from it (and simply reloads a finished one). Metrics go to
    `<out_path>.jsonl`, one line per log window.
    """
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    if recon not in ("l1", "l2"):
        raise UserError(f"recon must be 'l1' or 'l2', got {recon!r}")
    recon_fn = F.mse_loss if recon == "l2" else F.l1_loss
    device = torch.device(device)
    model.to(device).train().requires_grad_(True)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _lr_factor(s, warmup, steps))
    gen = torch.Generator().manual_seed(seed)
    ts = {"step": 0, "history": [], "restarted": 0, "time_s": 0.0,
          "last_hit_V": torch.full((model.vocab_size,), -dead_after, dtype=torch.long)}  # never used = dead
    out_path = Path(out_path) if out_path else None
    log_path = out_path.with_suffix(".jsonl") if out_path else None

    if out_path and out_path.is_file():
        ckpt = torch.load(out_path, map_location="cpu", weights_only=True)
        if ckpt.get("config") != model.config:
            raise UserError(f"{out_path} holds a tokenizer with config {ckpt.get('config')}, not {model.config}; "
                             f"delete it or choose another output path")
        model.load_state_dict(ckpt["state_dict"])
        if "train_state" not in ckpt:
            log.warning("%s is a finished tokenizer: reusing it", out_path)
            return ckpt["stats"]
        ts = ckpt["train_state"]
        optim.load_state_dict(ts.pop("optim"))
        sched.load_state_dict(ts.pop("sched"))
        gen.set_state(ts.pop("gen"))
        log.warning("resuming %s at step %d", out_path, ts["step"])
    elif log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
    last_hit_V = ts["last_hit_V"].to(device)
    window_hits_V = torch.zeros(model.vocab_size, device=device)
    window = dict.fromkeys(("loss", "recon_mse", "vq_loss", "n"), 0.0)
    t0 = time.time() - ts["time_s"]

    def stats() -> dict[str, Any]:
        last = ts["history"][-1] if ts["history"] else {}
        return {"steps": ts["step"], "time_s": time.time() - t0, "recon_mse": last.get("recon_mse"),
                "usage": last.get("usage"), "perplexity": last.get("perplexity"),
                "restarted_codes": ts["restarted"], "history": ts["history"]}

    def save(final: bool) -> None:
        ckpt = {"state_dict": model.state_dict(), "config": model.config, "stats": stats()}
        if not final:
            ckpt["train_state"] = {**ts, "last_hit_V": last_hit_V.cpu(), "time_s": time.time() - t0,
                                   "optim": optim.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state()}
        atomic_torch_save(ckpt, out_path)

    batches = _cycle(images)
    bar = tqdm(range(ts["step"] + 1, steps + 1), desc="tokenizer", disable=not progress, dynamic_ncols=True)
    for step in bar:
        img_B3HW = next(batches).to(device, non_blocking=True)
        out = model.forward_with_stats(img_B3HW)
        loss = recon_fn(out.rec_B3HW, img_B3HW) + out.vq_loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optim.step()
        sched.step()
        ts["step"] = step

        hit_V = out.hit_SV.sum(0)
        last_hit_V[hit_V > 0] = step
        window_hits_V += hit_V
        if restart_dead and (step == 1 or step % restart_every == 0) and step < steps:
            dead_V = step - last_hit_V >= dead_after
            ts["restarted"] += _restart_dead_codes(model, optim, dead_V, out.z_NC.detach(), gen)
            last_hit_V[dead_V] = step
        window["loss"] += loss.item()
        window["recon_mse"] += F.mse_loss(out.rec_B3HW.detach(), img_B3HW).item()
        window["vq_loss"] += out.vq_loss.item()
        window["n"] += 1

        if step % log_every == 0 or step == steps:
            n = window.pop("n")
            p_V = window_hits_V / window_hits_V.sum()
            row = {"step": step, **{k: v / n for k, v in window.items()},
                   "usage": (window_hits_V > 0).float().mean().item(),
                   "perplexity": torch.exp(-(p_V * p_V.clamp_min(1e-12).log()).sum()).item(),
                   "restarted_codes": ts["restarted"], "lr": sched.get_last_lr()[0], "time_s": time.time() - t0}
            ts["history"].append(row)
            bar.set_postfix(mse=f"{row['recon_mse']:.4f}", usage=f"{row['usage']:.2f}", ppl=f"{row['perplexity']:.0f}")
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            window = dict.fromkeys(("loss", "recon_mse", "vq_loss", "n"), 0.0)
            window_hits_V.zero_()
        if out_path and save_every > 0 and step % save_every == 0 and step < steps:
            save(final=False)

    model.eval()
    if out_path:
        save(final=True)
    return stats()
