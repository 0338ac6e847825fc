"""What the lookahead signal says at the end of a rater run, without a rater in between.

At the run's final proxy θ (and its AdamW state), every training pair's coefficient
c_i = ∇l_i(θ)·(P ⊙ v), v = ∇L_val(θ) on up to ``n_val`` validation pairs and P = 1/(ŝ + eps), AdamW's
per-coordinate step size without its curvature term (the step's gradient is not in the checkpoint):
the distillation stage's signal (``alchemist.bilevel.distill.pair_signal``);
a pair with a larger c_i helps the validation loss more. Reported per planted kind beside the rater's
own AUROC: where the two disagree, the rater did not learn what the signal ends up saying.
``proxy_steps``, ``captions`` and ``snapshots`` take the signal as the distillation stage's options do (a copy of the
proxy trained further; the caption agreement and the combined target), for any run.
"""
from __future__ import annotations

import json
from itertools import cycle
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from alchemist.bilevel.distill import combined_target, mean_rank, snapshot_points, snapshot_signals
from alchemist.build import build_proxy, build_text_encoder, build_tokenizer
from alchemist.config import RaterConfig, config_from_dict
from alchemist.data.pairs import PairsDataset, collate_pairs, load_pairs
from alchemist.data.tokens import Featurizer
from alchemist.utils.checkpoint import latest_checkpoint, load_checkpoint
from alchemist.utils.optim import build_optimizer
from alchemist.utils.update import apply_update, scaled_backward
from experiments.planted import auroc
from experiments.types import DEFECT_KINDS


def _batches(table: pd.DataFrame, image_size: int, featurize: Featurizer, bs: int):
    ds = PairsDataset(table, image_size)
    for lo in range(0, len(ds), bs):
        yield table.iloc[lo:lo + bs], featurize(collate_pairs([ds[i] for i in range(lo, min(len(ds), lo + bs))]))


def final_signal(run: str | Path, n_val: int = 400, eps: float = 1e-2, proxy_steps: int = 0,
                 captions: int = 0, snapshots: int = 1) -> pd.DataFrame:
    """Per defect kind of a demo-layout run folder (data/, rater/, ratings.parquet): AUROC of the
    final-proxy coefficient (``signal``), with ``captions`` of the caption agreement (``captions``) and
    of the combined target (``target``), and of the rater's score (clean > kind); the coefficient's
    mean (its mean rank with ``snapshots`` > 1); the validation loss of the loop's final proxy."""
    run = Path(run)
    cfg = config_from_dict(RaterConfig, json.loads((run / "rater/config.json").read_text()))
    o = cfg.optim
    ckpt = load_checkpoint(latest_checkpoint(run / "rater"))
    cpu = torch.device("cpu")
    no_amp = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    text = build_text_encoder(cfg.model, cpu)
    proxy = build_proxy(cfg.model, text.width, cpu)
    proxy.load_state_dict(ckpt["proxy"])
    featurize = Featurizer(build_tokenizer(cfg.model, cpu), text, cpu)
    val = next(_batches(load_pairs(cfg.data.val_csv_path, cfg.data).head(n_val), cfg.data.image_size, featurize,
                        n_val))[1]
    make_opt = lambda m: build_optimizer(m, o.opt, o.tlr, o.twd, (o.beta1, o.beta2))  # noqa: E731 (the trainer's)
    opt = make_opt(proxy)
    opt.load_state_dict(ckpt["opt_proxy"])
    with torch.no_grad():
        val_loss = float(proxy.eval().per_sample_loss(val).mean())
    train = load_pairs(cfg.data.train_csv_path, cfg.data)
    held = [(rows["id"].astype(str).tolist(), batch)
            for rows, batch in _batches(train.sample(frac=1.0, random_state=cfg.seed), cfg.data.image_size, featurize,
                                        o.bs)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # the trainer's update, in fp32

    def step(m, opt, loss):
        scaled_backward(loss, m, opt, scaler, o.grad_clip)
        apply_update(opt, scaler)
    ids, signals, agreements = snapshot_signals(
        proxy, opt, held, [val], cycle(b for _, b in held), snapshot_points(proxy_steps, snapshots), captions, eps,
        o.tlr, make_opt, step, no_amp, progress=False)
    # one signal: its raw values (their mean is reported); several: their mean rank (distill.mean_rank)
    df = pd.DataFrame({"id": ids, "c": signals[0] if len(signals) == 1 else mean_rank(signals)})
    columns = {"signal": "c", "rater": "score"}
    if agreements:
        df["a"] = np.mean(agreements, axis=0)
        df["t"] = combined_target(df["c"].to_numpy(), df["a"].to_numpy())
        columns = {"signal": "c", "captions": "a", "target": "t", "rater": "score"}
    kinds = pd.read_csv(run / "data/defects.csv", dtype={"id": str}, keep_default_na=False).set_index("id")["kind"]
    ratings = pd.read_parquet(run / "ratings.parquet")
    df["kind"] = df["id"].map(kinds)
    df["score"] = df["id"].map(ratings.set_index(ratings["id"].astype(str))["score"])
    clean = df[df["kind"] == "clean"]
    rows = [{**{f"{name}_auroc": auroc(clean[col], df.loc[df["kind"] == k, col]) for name, col in columns.items()},
             "kind": k, "signal_mean": float(df.loc[df["kind"] == k, "c"].mean()), "val_loss": val_loss}
            for k in DEFECT_KINDS if (df["kind"] == k).any()]
    return pd.DataFrame(rows).set_index("kind")
