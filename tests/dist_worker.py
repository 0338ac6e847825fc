"""Bilevel steps on two gloo processes at toy size, for tests/test_multiprocess.py.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py OUT_DIR SCENARIO [SCENARIO ...]

Each scenario drives ``BilevelTrainer`` directly on per-rank synthetic TokenBatches (no tokenizer, no
text encoder: seconds, not minutes) and writes what each rank saw to ``OUT_DIR/<scenario>_rank<r>.json``:
weight digests (equal on every rank when the replicas agree), finiteness, scaler scales, which steps
were skipped. A scenario that fails records its error; a collective that never finds its partner
times out (``DIST_TIMEOUT`` seconds) instead of hanging the test.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from alchemist.batch import TextFeatures, TokenBatch
from alchemist.bilevel.trainer import BilevelTrainer
from alchemist.build import build_proxy, build_rater
from alchemist.config import RaterConfig, load_config
from alchemist.data.sampler import ResumableSampler, Stream
from alchemist.utils.checkpoint import latest_checkpoint, load_checkpoint

PATCH_NUMS, V, CVAE, TEXT_DIM, T, PER_RANK = (1, 2, 4), 16, 4, 8, 3, 4
PRECISIONS = {"fp32": 0, "fp16": 1, "bf16": 2}


def config(out: Path, name: str, **over) -> RaterConfig:
    base = {"image_size": 16, "patch_size": 4, "patch_nums": list(PATCH_NUMS), "vocab_size": V, "Cvae": CVAE,
            "vae_ch_mult": [1, 2, 2], "depth": 2, "raterDepth": 1, "drop_path_rate": 0.0, "bs": 2 * PER_RANK,
            "ep": 1, "tlr": 3e-3, "rater_lr": 3e-3, "wp": 0.01, "fp16": 0, "gamma_start": 0.7,
            "local_out_dir_path": str(out), "exp_name": name, "progress": False, "log_every": 1,
            "save_every": 1000}
    return load_config(RaterConfig, None, {**base, **over})


def batch(step: int, rank: int, split: str) -> TokenBatch:
    """Different data on every rank and step, the same on every run."""
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + (split == "val"))
    L = sum(p * p for p in PATCH_NUMS)
    text = TextFeatures(torch.randn(PER_RANK, T, TEXT_DIM, generator=g), torch.ones(PER_RANK, T, dtype=torch.bool),
                        torch.randn(PER_RANK, TEXT_DIM, generator=g))
    return TokenBatch(torch.randint(0, V, (PER_RANK, L), generator=g),
                      torch.randn(PER_RANK, L - 1, CVAE, generator=g), text,
                      torch.randn(PER_RANK, PATCH_NUMS[-1] ** 2, CVAE, generator=g))


def trainer(cfg: RaterConfig, rank: int, world: int, featurize=None, raws=None,
            device: torch.device | str = "cpu") -> BilevelTrainer:
    """Models seeded per rank (the trainer broadcasts rank 0's) on ``device``; streams over ``raws``."""
    torch.manual_seed(cfg.seed + rank)
    dev = torch.device(device)
    proxy, rater = build_proxy(cfg.model, TEXT_DIM, dev), build_rater(cfg.model, TEXT_DIM, dev)
    raws = raws or []

    def stream(offset):
        return Stream(lambda s: iter(raws[offset::2]), ResumableSampler(max(len(raws) // 2, 1) * cfg.optim.bs,
                                                                        shuffle=False, rank=rank, world=world),
                      PER_RANK)

    return BilevelTrainer(cfg, proxy, rater, featurize or (lambda r: r), stream(1), stream(0), dev,
                          is_main=rank == 0)


def digest(*models) -> str:
    h = hashlib.sha1()
    for m in models:
        for t in m.state_dict().values():
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def finite(*models) -> bool:
    return all(bool(torch.isfinite(t).all()) for m in models for t in m.state_dict().values() if t.is_floating_point())


def state(tr: BilevelTrainer) -> dict:
    return {"proxy": digest(tr.proxy), "rater": digest(tr.rater), "finite": finite(tr.proxy, tr.rater),
            "scales": [s.get_scale() if s.is_enabled() else 1.0 for s in tr.scalers]}


def step(tr: BilevelTrainer, i: int, rank: int) -> bool:
    """One bilevel step on step i's batches; False when it was skipped."""
    return tr.train_step(batch(i, rank, "train"), batch(i, rank, "val")) is not None


# ----------------------------------------------------------------------------- scenarios
def overflow(out, rank, world):
    """fp16: rank 1's proxy gradient overflows at step 1 (the reference proxy's too, for that rule)."""
    rec = {}
    for rule in ("penalty", "reference"):
        tr = trainer(config(out, f"overflow_{rule}", fp16=1, estimator=rule), rank, world)
        step(tr, 0, rank)
        before = state(tr)
        hooks = []
        if rank == 1:
            inf = lambda g: torch.full_like(g, float("inf"))  # noqa: E731
            hooks.append(next(tr.proxy.parameters()).register_hook(inf))
            if rule == "reference":
                hooks.append(next(tr.estimator.ref.parameters()).register_hook(inf))
        step(tr, 1, rank)
        for h in hooks:
            h.remove()
        after = state(tr)
        step(tr, 2, rank)
        rec[rule] = {"before": before, "after": after, "next": state(tr)}
        if rule == "reference":
            rec[rule]["ref_finite"] = finite(tr.estimator.ref)
            rec[rule]["ref_digest"] = digest(tr.estimator.ref)
            scaler = getattr(tr.estimator, "scaler", None)
            rec[rule]["ref_scale"] = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
    return rec


def nonfinite_loss(out, rank, world):
    """Rank 1 alone sees a non-finite proxy loss, then (penalty) a non-finite rater loss, at step 1."""
    rec = {}
    for rule, where in (("penalty", "proxy"), ("lookahead", "proxy"), ("penalty", "rater")):
        tr = trainer(config(out, f"nan_{rule}_{where}", estimator=rule), rank, world)
        ran = [step(tr, 0, rank)]
        before = state(tr)
        if rank == 1 and where == "proxy":
            real = tr.proxy.per_sample_loss
            tr.proxy.per_sample_loss = lambda b: real(b) * float("nan")
        if rank == 1 and where == "rater":
            real_c = tr.estimator.coefficients
            tr.estimator.coefficients = lambda ctx: real_c(ctx) * float("nan")
        ran.append(step(tr, 1, rank))
        tr.proxy.__dict__.pop("per_sample_loss", None)
        tr.estimator.__dict__.pop("coefficients", None)
        after = state(tr)
        ran.append(step(tr, 2, rank))
        rec[f"{rule}_{where}"] = {"ran": ran, "before": before, "after": after, "next": state(tr)}
    return rec


def empty_batch(out, rank, world):
    """TrainLoop.fit: every row of rank 1's second batch was unreadable (featurize gives None)."""
    raws = [{"step": i // 2, "split": ("train", "val")[i % 2]} for i in range(6)]  # 3 steps of (train, val)

    def featurize(raw):
        if rank == 1 and raw["step"] == 1 and raw["split"] == "val":
            return None
        return batch(raw["step"], rank, raw["split"])

    tr = trainer(config(out, "empty"), rank, world, featurize, raws)
    summary = tr.fit()
    return {"steps": tr.step_idx, "summary_steps": summary["steps"], **state(tr)}


def resume(out, rank, world):
    """Drop-path draws differ per rank: 4 straight steps against 2, a checkpoint, a fresh process
    state resumed from it, and 2 more."""
    cfg = config(out, "resume", drop_path_rate=0.5, estimator="penalty")
    tr = trainer(cfg, rank, world)
    for i in range(2):
        step(tr, i, rank)
    tr.step_idx = 2
    tr.save()
    dist.barrier()
    for i in range(2, 4):
        step(tr, i, rank)
    straight = state(tr)
    torch.manual_seed(12345)  # what a restarted process holds before the checkpoint is read
    tr2 = trainer(cfg, rank, world)
    tr2.load_state_dict(load_checkpoint(latest_checkpoint(cfg.output.run_dir)))
    for i in range(2, 4):
        step(tr2, i, rank)
    return {"straight": straight, "resumed": state(tr2)}


def rules(out, rank, world):
    """Every rule in every precision the config offers, two steps each."""
    rec = {}
    for rule in ("penalty", "reference", "lookahead"):
        for name, fp16 in PRECISIONS.items():
            tr = trainer(config(out, f"{rule}_{name}", estimator=rule, fp16=fp16), rank, world)
            first = state(tr)
            ran = [step(tr, i, rank) for i in range(2)]
            rec[f"{rule}_{name}"] = {"ran": ran, "first": first, "last": state(tr)}
    return rec


SCENARIOS = {f.__name__: f for f in (overflow, nonfinite_loss, empty_batch, resume, rules)}


def main(out: str, names: list[str]) -> None:
    timeout = datetime.timedelta(seconds=float(os.environ.get("DIST_TIMEOUT", "60")))
    dist.init_process_group("gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for name in names:
        try:
            rec = {"ok": True, **SCENARIOS[name](Path(out) / name, rank, world)}
        except Exception as e:  # noqa: BLE001 — recorded for the test to show
            rec = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        (Path(out) / f"{name}_rank{rank}.json").write_text(json.dumps(rec, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
