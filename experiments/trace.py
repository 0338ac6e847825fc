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

from alchemist.bilevel.launch import train_rater
from alchemist.config import RaterConfig, config_to_dict, load_config
from alchemist.ratings import read_ratings
from alchemist.scoring import rate_file
from experiments.planted import kind_report
from experiments.types import DEFECT_KINDS


def batch_z(x: np.ndarray) -> np.ndarray:
    """Batch z-score; all zeros when the batch has no spread (e.g. every coefficient 0 at γ = 1)."""
    sd = x.std()
    return np.zeros_like(x) if sd == 0 else (x - x.mean()) / sd


def trace_frame(records: Sequence[dict], kinds: pd.Series) -> pd.DataFrame:
    """One row per (step, pair): its batch z-scored coefficient and logit, and its planted kind;
    steps whose coefficients are all zero taught the rater nothing and are left out."""
    parts = [pd.DataFrame({"step": r["step"], "gamma": r["gamma"], "id": [str(i) for i in r["ids"]],
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


def coefficient_trace(run: str | Path, out: str | Path, overrides: Sequence[str] = (), spans: int = 4) -> str:
    """Retrain ``run``'s rater into ``out`` with the coefficient trace on; writes <out>/trace.parquet,
    <out>/ratings.parquet and <out>/trace.md, and returns the report."""
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
        + ", ".join(f"{k} {v:.3f}" for k, v in rep["auroc"].items() if k in DEFECT_KINDS)])
    (out / "trace.md").write_text(text + "\n")
    return text
