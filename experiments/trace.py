"""What the rater is taught along a run, per planted kind: the coefficient trace.

Reruns a demo-layout run's rater (its data, tokenizer and config, with overrides) into another
folder while recording, at every rater step, each training pair's coefficient as the rater's loss
used it and the rater's logit for it. Per planted kind and span of steps it reports the mean batch
z-score of both (coefficient > 0: the step says the pair hurts the validation loss), so one can see
when the signal says what, and whether the rater follows; and the final rater's AUROC per kind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from alchemist.batch import TokenBatch
from alchemist.bilevel.launch import train_rater
from alchemist.build import build_rater, build_text_encoder, build_tokenizer
from alchemist.config import RaterConfig, config_from_dict, config_to_dict, load_config
from alchemist.data.pairs import PairsDataset, collate_pairs, load_pairs
from alchemist.data.tokens import Featurizer
from alchemist.ratings import read_ratings
from alchemist.scoring import rate_file
from alchemist.utils.optim import build_optimizer
from experiments.planted import auroc, kind_report
from experiments.types import DEFECT_KINDS


def batch_z(x: np.ndarray) -> np.ndarray:
    """Batch z-score; all zeros when the batch has no spread (e.g. every coefficient 0 at γ = 1)."""
    sd = x.std()
    return np.zeros_like(x) if sd == 0 else (x - x.mean()) / sd


def trace_frame(records: Sequence[dict], kinds: pd.Series) -> pd.DataFrame:
    """One row per (step, pair): its batch z-scored coefficient and logit, and its planted kind;
    steps whose coefficients are all zero taught the rater nothing and are left out."""
    parts = [pd.DataFrame({"step": r["step"], "gamma": r["gamma"], "id": [str(i) for i in r["ids"]],
                           "a": np.asarray(r["a"], dtype=np.float64),
                           "a_z": batch_z(np.asarray(r["a"], dtype=np.float64)),
                           "logit_z": batch_z(np.asarray(r["logit"], dtype=np.float64))})
             for r in records if np.any(np.asarray(r["a"]) != 0)]
    df = pd.concat(parts, ignore_index=True)
    return df.assign(kind=df["id"].map(kinds))


def per_span(df: pd.DataFrame, column: str, spans: int) -> pd.DataFrame:
    """Mean of ``column`` per kind over ``spans`` equal spans of the recorded steps (rows: spans)."""
    edges = np.linspace(df["step"].min(), df["step"].max() + 1, spans + 1)
    span = np.searchsorted(edges, df["step"], side="right") - 1
    label = [f"{int(edges[i])}-{int(edges[i + 1]) - 1}" for i in range(spans)]
    table = df.assign(steps=[label[i] for i in span]).pivot_table(index="steps", columns="kind", values=column,
                                                                 aggfunc="mean", sort=False)
    return table.reindex(columns=[k for k in ("clean", *DEFECT_KINDS) if k in table.columns])


def refit(out: str | Path, passes: int, standardize: bool, seed: int = 0) -> pd.DataFrame:
    """A fresh rater trained on a recorded trace alone (<out>/trace.parquet, the rerun's config), the
    recorded steps replayed ``passes`` times (in order, then shuffled): can this rater learn what the
    signal says, given more passes over it? Each step's coefficients are centred, and with
    ``standardize`` divided by their std. Rows: passes; columns: the AUROC per planted kind (clean >
    kind) of the refit rater's scores on the whole training table."""
    out = Path(out)
    cfg = config_from_dict(RaterConfig, json.loads((out / "rater/config.json").read_text()))
    cpu = torch.device("cpu")
    text = build_text_encoder(cfg.model, cpu)
    featurize = Featurizer(build_tokenizer(cfg.model, cpu), text, cpu)
    table = load_pairs(cfg.data.train_csv_path, cfg.data)
    ds = PairsDataset(table, cfg.data.image_size)
    every = [featurize(collate_pairs([ds[i] for i in range(lo, min(len(ds), lo + 256))]))
             for lo in range(0, len(ds), 256)]
    rows = TokenBatch.cat(every)
    position = {i: k for k, i in enumerate(table["id"].astype(str))}
    kinds = table["id"].astype(str).map(
        pd.read_csv(Path(cfg.data.train_csv_path).parent / "defects.csv", dtype={"id": str},
                    keep_default_na=False).set_index("id")["kind"]).to_numpy()
    trace = pd.read_parquet(out / "trace.parquet")
    steps = [(torch.tensor([position[i] for i in g["id"]]), torch.tensor(g["a"].to_numpy(), dtype=torch.float32))
             for _, g in trace.groupby("step", sort=True)]
    torch.manual_seed(seed)
    rater = build_rater(cfg.model, text.width, cpu)
    opt = build_optimizer(rater, cfg.optim.opt, cfg.optim.rater_lr, cfg.optim.rater_wd, (cfg.optim.beta1, cfg.optim.beta2))
    rng = np.random.default_rng(seed)
    result = []
    for p in range(passes):
        rater.train()
        for j in (rng.permutation(len(steps)) if p else range(len(steps))):
            sel, a_B = steps[j]
            a_B = a_B - a_B.mean()
            if standardize:
                a_B = a_B / a_B.std().clamp_min(1e-30)
            loss = (rater(rows.index(sel)).weight_B * a_B).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rater.parameters(), cfg.optim.grad_clip)
            opt.step()
        rater.eval()
        with torch.no_grad():
            score = torch.cat([rater(rows.index(slice(lo, lo + 256))).logit_B for lo in range(0, rows.B, 256)]).numpy()
        result.append({k: auroc(score[kinds == "clean"], score[kinds == k]) for k in DEFECT_KINDS if (kinds == k).any()})
    return pd.DataFrame(result, index=pd.RangeIndex(1, passes + 1, name="passes"))


def coefficient_trace(run: str | Path, out: str | Path, overrides: Sequence[str] = (), spans: int = 4,
                      refit_passes: int = 0) -> str:
    """Retrain ``run``'s rater into ``out`` with the coefficient trace on; writes <out>/trace.parquet,
    <out>/ratings.parquet and <out>/trace.md, and returns the report; with ``refit_passes``, also
    what a fresh rater learns from the trace alone (``refit``), centred and standardised."""
    run, out = Path(run), Path(out)
    base = json.loads((run / "rater/config.json").read_text())
    base["output"].update(local_out_dir_path=str(out), exp_name="rater", resume="none")
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_config.json").write_text(json.dumps(base, indent=2))
    cfg = load_config(RaterConfig, out / "base_config.json", overrides)
    records: list[dict] = []
    train_rater(cfg, on_coefficients=records.append)
    defects = pd.read_csv(run / "data/defects.csv", dtype={"id": str}, keep_default_na=False)
    kinds = defects.set_index("id")["kind"]
    df = trace_frame(records, kinds)
    df.to_parquet(out / "trace.parquet", index=False)
    rate_file(cfg.output.run_dir, cfg.data.train_csv_path, out / "ratings.parquet",
              overrides=[f"--ckpt_path={cfg.model.ckpt_path}"], progress=False)
    rep = kind_report(read_ratings(out / "ratings.parquet"), defects[defects["split"] == "train"])
    changed = {k: v for k, v in config_to_dict(cfg)["bilevel"].items() if base["bilevel"].get(k) != v}
    text = "\n\n".join([
        f"Coefficient trace of {run} (rater rerun in {out}; bilevel changes: {changed or 'none'}; "
        f"model.rater_full_image={cfg.model.rater_full_image})",
        "Mean batch z-score of the coefficient each pair taught the rater (> 0: the step says it hurts):\n"
        + per_span(df, "a_z", spans).round(2).to_string(),
        "Mean batch z-score of the rater's logit for the pairs at the step they were drawn:\n"
        + per_span(df, "logit_z", spans).round(2).to_string(),
        "Final rater's AUROC, clean > kind: "
        + ", ".join(f"{k} {v:.3f}" for k, v in rep["auroc"].items() if k in DEFECT_KINDS)]
        + [f"A fresh rater refit on the trace alone, coefficients {how} (AUROC clean > kind after each pass):\n"
           + refit(out, refit_passes, standardize).round(3).to_string()
           for how, standardize in (("centred", False), ("standardised", True)) if refit_passes])
    (out / "trace.md").write_text(text + "\n")
    return text
