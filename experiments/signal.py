"""What the lookahead signal says at the end of a rater run, without a rater in between.

At the run's final proxy θ (and its AdamW state), every training pair's coefficient
c_i = ∇l_i(θ)·(P ⊙ v), v = ∇L_val(θ) on up to ``n_val`` validation pairs and P = 1/(ŝ + eps), AdamW's
per-coordinate step size without its curvature term (the step's gradient is not in the checkpoint):
the distillation stage's signal (``alchemist.bilevel.distill.pair_signal``);
a pair with a larger c_i helps the validation loss more. Reported per planted kind beside the rater's
own AUROC: where the two disagree, the rater did not learn what the signal ends up saying.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from alchemist.bilevel.distill import pair_signal
from alchemist.build import build_proxy, build_text_encoder, build_tokenizer
from alchemist.config import RaterConfig, config_from_dict
from alchemist.data.pairs import PairsDataset, collate_pairs, load_pairs
from alchemist.data.tokens import Featurizer
from alchemist.utils.checkpoint import latest_checkpoint, load_checkpoint
from alchemist.utils.optim import build_optimizer
from experiments.planted import auroc
from experiments.types import DEFECT_KINDS


def _batches(table: pd.DataFrame, image_size: int, featurize: Featurizer, bs: int):
    ds = PairsDataset(table, image_size)
    for lo in range(0, len(ds), bs):
        yield table.iloc[lo:lo + bs], featurize(collate_pairs([ds[i] for i in range(lo, min(len(ds), lo + bs))]))


def final_signal(run: str | Path, n_val: int = 400, eps: float = 1e-2) -> pd.DataFrame:
    """Per defect kind of a demo-layout run folder (data/, rater/, ratings.parquet): AUROC of the
    final-proxy coefficient and of the rater's score (clean > kind), and the coefficient's mean."""
    run = Path(run)
    cfg = config_from_dict(RaterConfig, json.loads((run / "rater/config.json").read_text()))
    ckpt = load_checkpoint(latest_checkpoint(run / "rater"))
    cpu = torch.device("cpu")
    text = build_text_encoder(cfg.model, cpu)
    proxy = build_proxy(cfg.model, text.width, cpu)
    proxy.load_state_dict(ckpt["proxy"])
    proxy.eval()
    featurize = Featurizer(build_tokenizer(cfg.model, cpu), text, cpu)
    val = load_pairs(cfg.data.val_csv_path, cfg.data).head(n_val)
    opt = build_optimizer(proxy, "adamw", 1.0, 0.0)  # the trainer's grouping, so its saved state maps back
    opt.load_state_dict(ckpt["opt_proxy"])
    train = load_pairs(cfg.data.train_csv_path, cfg.data)
    c = pair_signal(proxy, opt, [next(_batches(val, cfg.data.image_size, featurize, n_val))[1]],
                    ((rows["id"].astype(str).tolist(), batch)
                     for rows, batch in _batches(train, cfg.data.image_size, featurize, 200)),
                    eps, lambda: torch.autocast("cpu", enabled=False))
    df = pd.DataFrame({"id": list(c), "c": list(c.values())})
    kinds = pd.read_csv(run / "data/defects.csv", dtype={"id": str}, keep_default_na=False).set_index("id")["kind"]
    ratings = pd.read_parquet(run / "ratings.parquet")
    df["kind"] = df["id"].map(kinds)
    df["score"] = df["id"].map(ratings.set_index(ratings["id"].astype(str))["score"])
    clean = df[df["kind"] == "clean"]
    rows = [{"kind": k, "signal_auroc": auroc(clean["c"], df.loc[df["kind"] == k, "c"]),
             "rater_auroc": auroc(clean["score"], df.loc[df["kind"] == k, "score"]),
             "signal_mean": float(df.loc[df["kind"] == k, "c"].mean())}
            for k in DEFECT_KINDS if (df["kind"] == k).any()]
    return pd.DataFrame(rows).set_index("kind")
