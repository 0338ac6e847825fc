"""The selection experiment's results: the per-arm summary (results.json), the Markdown section and the
loss-curve figure. Nothing here trains or evaluates.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import platform
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from alchemist.utils.io import atomic_open
from experiments.planted import N_DECILES
from experiments.types import DEFECT_KINDS, HEURISTIC_CANDIDATES, KINDS, Arm, ExperimentConfig, Inputs, finite

SECTION_START = "<!-- selection-experiment:start -->"
SECTION_END = "<!-- selection-experiment:end -->"
METRICS = (("heldout_loss", "held-out loss ↓", "{:.4f}"), ("geneval", "GenEval-lite ↑", "{:.3f}"),
           ("geneval_all_correct", "all-correct ↑", "{:.3f}"), ("fid_lite", "FID-lite ↓", "{:.4g}"))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value); NaN when empty."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.node()}: {cpu}, {n} CPU cores usable, {platform.system()} {platform.release()}, " \
           f"torch {torch.__version__}"


def summarise(cfg: ExperimentConfig, inp: Inputs, arms: list[Arm], records: list[dict], quality: dict,
              chosen: list[str], why: str, clf_stats: dict | None, command: str, seconds: float) -> dict:
    per_arm = []
    for arm in arms:
        recs = [r for r in records if r["arm"] == arm.name]
        row = {"arm": arm.name, "label": arm.label, "source": arm.source, "strategy": arm.strategy,
               "retention": arm.retention, "n_seeds": len(recs), "train_rows": recs[0]["train_rows"],
               "steps": recs[0]["steps"]}
        for key, _, _ in METRICS:
            m, s = mean_std([r.get(key) for r in recs])
            row[key] = {"mean": m, "std": s, "values": [r.get(key) for r in recs]}
        row["composition"] = {k: float(np.mean([r["composition"][k] for r in recs])) for k in KINDS}
        per_arm.append(row)
    best_heur = None
    heur_rows = [a for a in per_arm if a["source"] in HEURISTIC_CANDIDATES]
    if heur_rows:
        best_heur = min(heur_rows, key=lambda a: a["heldout_loss"]["mean"])["arm"]
    m = inp.base.model
    return {
        "command": command, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "jobs": cfg.jobs, "threads": cfg.threads, "seconds": seconds,
        "config": {**dataclasses.asdict(cfg), "epochs": inp.epochs,
                   "t2i": {"depth": m.depth, "bs": inp.base.optim.bs, "tlr": inp.base.optim.tlr,
                           "image_size": inp.base.data.image_size, "cfg": m.cfg, "top_k": m.top_k, "top_p": m.top_p}},
        "n_rated": len(inp.ratings), "demo_counts": inp.defects["kind"].value_counts().reindex(KINDS, fill_value=0)
        .astype(int).to_dict(),
        "heuristics": {"trained": chosen, "why": why, "best": best_heur},
        "classifier": clf_stats, "planted": quality, "arms": per_arm, "runs": records,
    }


def _fmt(stat: dict, fmt: str) -> str:
    if not finite(stat["mean"]):
        return "–"
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def _verdict(results: dict) -> list[str]:
    """Plain comparisons of the claim's three pairs, with the seed spread to judge them by."""
    arms = {a["arm"]: a for a in results["arms"]}
    lines = []

    def cmp(a, b, key="heldout_loss", lower=True):
        if a not in arms or b not in arms:
            return
        x, y = arms[a][key], arms[b][key]
        if not (finite(x["mean"]) and finite(y["mean"])):
            return
        diff = x["mean"] - y["mean"]
        spread = math.hypot(x["std"], y["std"])
        better = (diff < 0) == lower
        size = "within the seed spread" if abs(diff) <= spread else ("better" if better else "worse")
        lines.append(f"- {arms[a]['label']} vs {arms[b]['label']}: {x['mean']:.4f} vs {y['mean']:.4f} "
                     f"(Δ {diff:+.4f}, spread {spread:.4f}): **{size}**.")

    cmp("shift_gsample_50", "random_50")
    cmp("shift_gsample_50", "full")
    cmp("shift_gsample_50", "topk_50")
    cmp("shift_gsample_20", "random_20")
    if results["heuristics"]["best"]:
        cmp("shift_gsample_50", results["heuristics"]["best"])
    for name, a in arms.items():
        if a["source"].startswith("rule:"):
            cmp(name, "random_50")
            cmp(name, "shift_gsample_50")
    return lines


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def render_markdown(results: dict, figure: Path, doc: Path) -> str:
    c = results["config"]
    t2i = c["t2i"]
    n_seeds = len(c["seeds"])
    counts = ", ".join(f"{v} {k}" for k, v in results["demo_counts"].items())
    fig_rel = os.path.relpath(figure, doc.parent)
    run_minutes = sum(r["train_seconds"] + r["eval_seconds"] for r in results["runs"]
                      if finite(r["train_seconds"])) / 60
    epochs = f"{c['epochs']} epoch{'s' if c['epochs'] != 1 else ''}"
    lines = [SECTION_START,
             "## Selection experiment: Alchemist subset vs random, Top-K, heuristics and full data",
             "",
             "_Generated by `experiments.experiment`; rerunning the command replaces this section._",
             "",
             f"- Command: `{results['command'] or 'run_experiment(...)'}`",
             f"- Date: {results['date']}; this invocation {results['seconds'] / 60:.1f} min wall; the runs' own "
             f"training + evaluation {run_minutes:.1f} min summed over runs ({results['jobs']} parallel run(s), "
             f"{results['threads']} torch thread(s) each)",
             f"- Machine: {results['machine']}",
             f"- Data: the demo's {results['n_rated']} rated training pairs ({counts}); clean val split for the "
             f"held-out loss and the prompts.",
             f"- Downstream model: `{c['t2i_config']}` (depth {t2i['depth']}, {t2i['image_size']} px, batch "
             f"{t2i['bs']}, lr {t2i['tlr']:g}), **{epochs} in every arm** (a 50 % subset gets half "
             f"the steps), seeds {list(c['seeds'])} (the seed sets both the selection of the sampled arms and "
             f"the training).",
             f"- Generation: the first {c['n_generate']} clean val captions, cfg {t2i['cfg']:g}, top-k "
             f"{t2i['top_k']}, top-p {t2i['top_p']:g}; GenEval-lite and FID-lite (vs the same captions' real "
             f"images) judged by the attribute classifier"
             + (f" (held-out accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                   results["classifier"]["heldout_accuracy"].items()) + ")"
                if results.get("classifier") else "") + ".",
             f"- Heuristic arm(s): {results['heuristics']['why']}.",
             "",
             f"### Downstream results (mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''})",
             ""]
    header = ["arm", "rows", "steps"] + [h for _, h, _ in METRICS] + ["clean share"]
    rows = []
    for a in results["arms"]:
        label = a["label"] + (" (best heuristic)" if a["arm"] == results["heuristics"]["best"]
                              and len(results["heuristics"]["trained"]) > 1 else "")
        rows.append([label, str(a["train_rows"]), str(a["steps"])] + [_fmt(a[k], f) for k, _, f in METRICS]
                    + [f"{a['composition']['clean']:.0%}"])
    ref = results.get("reference") or {}
    if ref:
        fid = f"{ref['fid_lite']:.4g}" if finite(ref.get("fid_lite")) else "–"
        rows.append([f"_real val images (reference, {ref['n']})_", "", "", "–", f"{ref['geneval']:.3f}",
                     f"{ref['geneval_all_correct']:.3f}", fid, ""])
    lines += [_md_table(header, rows), ""]
    if ref:
        lines += ["The reference row scores real images: GenEval-lite of the prompts' own images (the most the "
                  "classifier can confirm) and FID-lite of the next clean val images against them (the floor at "
                  "this number of images).", ""]
    lines += [f"![held-out loss per epoch for each arm]({fig_rel})", ""]
    verdict = _verdict(results)
    if verdict:
        lines += ["Reading (held-out token loss; a difference within the combined seed spread is not a result):",
                  "", *verdict, ""]
    lines += ["### What each subset holds (share of the planted kinds, mean over seeds)", ""]
    lines += [_md_table(["arm"] + list(KINDS),
                        [[a["label"]] + [f"{a['composition'][k]:.1%}" for k in KINDS] for a in results["arms"]]), ""]

    planted = results["planted"]
    lines += ["### Rankings on planted defects (no downstream training)", "",
              "AUROC of the ranking score, clean pairs (positive) vs each planted kind: 1 = every clean pair "
              "above every pair of the kind, 0.5 = chance. `plain` below 0.5 means plain, easy images rank above "
              "clean ones: the shape the paper reports for its rater, which Shift-Gsample's shift is built to drop.",
              ""]
    kinds = [k for k in DEFECT_KINDS if any(k in q["auroc"] for q in planted.values())]
    lines += [_md_table(["ranking"] + kinds + ["mean"],
                        [[_ranking_label(n)] + [f"{q['auroc'].get(k, math.nan):.3f}" for k in kinds]
                         + [f"{q['mean_auroc']:.3f}"] for n, q in planted.items()]), ""]
    for name, q in planted.items():
        if name in HEURISTIC_CANDIDATES:
            continue
        lines += [f"Rank deciles of {_ranking_label(name)} (share of each kind in each tenth of the ranking, "
                  "0 = best):", ""]
        lines += [_md_table(["kind", "n"] + [str(d) for d in range(N_DECILES)],
                            [[k, str(q["n"][k])] + [f"{x:.0%}" for x in row] for k, row in q["deciles"].items()]), ""]
    if not any(n.startswith("rule:") for n in planted):
        lines += ["_No per-rule ratings were found (`<demo>/rules/<rule>/ratings.parquet` from "
                  "scripts/experiment.py rules); only the main rater is shown._", ""]
    lines += ["Not run: an equal-steps variant (smaller subsets trained for proportionally more epochs); it "
              "would double the cost of the 50 % arms.", "", SECTION_END]
    return "\n".join(lines) + "\n"


def _ranking_label(name: str) -> str:
    if name == "rater":
        return "rater (ratings.parquet)"
    if name.startswith("rule:"):
        return f"rater, rule `{name[5:]}`"
    return f"heuristic `{name}`"


def write_doc_section(path: Path, section: str) -> Path:
    """Replace the experiment's marked section of ``path`` (or append it; create the file if needed)."""
    old = path.read_text() if path.is_file() else "# Results\n"
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END) + r"\n?", re.S)
    new = pattern.sub(lambda _: section, old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + section
    with atomic_open(path) as f:
        f.write(new)
    return path


def plot_loss_curves(results: dict, out: Path) -> Path:
    """Held-out loss per arm over epochs and over optimizer steps: mean over seeds, min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    cmap = plt.get_cmap("tab10")
    for i, a in enumerate(results["arms"]):
        curves = [r["curve"] for r in results["runs"] if r["arm"] == a["arm"] and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        loss = np.array([[p["heldout_loss"] for p in c[:n]] for c in curves])
        epochs = np.array([p["epoch"] for p in curves[0][:n]])
        steps = np.array([p["step"] for p in curves[0][:n]])
        style = dict(color="k" if a["source"] == "all" else cmap(i % 10),
                     ls="--" if a["retention"] < 0.5 else "-", marker="o", ms=3)
        for ax, x in zip(axes, (epochs, steps)):
            ax.plot(x, loss.mean(0), label=a["label"], **style)
            if len(curves) > 1:
                ax.fill_between(x, loss.min(0), loss.max(0), color=style["color"], alpha=0.15, lw=0)
    axes[0].set(xlabel="epoch", ylabel="held-out token loss", title="held-out loss per epoch (same epochs)")
    axes[1].set(xlabel="optimizer steps", ylabel="held-out token loss", title="the same against steps")
    axes[0].legend(frameon=False, fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out
