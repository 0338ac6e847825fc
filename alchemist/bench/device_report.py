"""What scripts/device_check.sh leaves in its folder, as one JSON record and one Markdown page: each
stage's status and time, the kill-and-resume of the training run, the scoring run, the benchmark rows
and the issue's throughput targets (twice the authors' figures on one H100). Reads files only; no torch."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

# the authors' code on one H100 (docs/performance.md); the targets are twice their throughputs
AUTHORS = {"bilevel_raw": 81.7, "bilevel_cache": 105.3, "score_cache": 2210.0, "score_raw": 285.0}
TARGETS = [  # name, (kind, mode, rule), field, comparison, goal
    ("bilevel penalty step, tokenizer + text encoder in the step (img/s)", ("bilevel", "raw", "penalty"),
     "img_per_s", ">=", 2 * AUTHORS["bilevel_raw"]),
    ("bilevel penalty step, from the feature cache (img/s)", ("bilevel", "cache", "penalty"), "img_per_s", ">=",
     2 * AUTHORS["bilevel_cache"]),
    ("bilevel ÷ plain proxy step, feature cache", ("bilevel", "cache", "penalty"), "vs_plain", "<=", 2.3),
    ("bilevel ÷ plain proxy step, raw images", ("bilevel", "raw", "penalty"), "vs_plain", "<=", 2.3),
    ("scoring from the cache, batch 256 (img/s)", ("score", "cache", ""), "img_per_s", ">=", 2 * AUTHORS["score_cache"]),
    ("scoring with tokenizer + text encoder (img/s)", ("score", "raw", ""), "img_per_s", ">=",
     2 * AUTHORS["score_raw"]),
    ("peak memory of a 64 + 64 bilevel step, raw images (GiB)", ("bilevel", "raw", "penalty"), "peak_mem_gib", "<=",
     80.0),
]


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _rows(bench: dict | None) -> dict[tuple, dict]:
    return {} if not bench else {(r["kind"], r["mode"], r["rule"]): r for r in bench["rows"]}


def collect(out: str | Path) -> dict[str, Any]:
    """Everything the check measured, from its folder ``out``."""
    out = Path(out)
    stages = _lines(out / "stages.jsonl")
    meta = _json(out / "meta.json") or {}
    run = out / "train"
    resumed = re.search(r"resumed from \S+ at step (\d+)", (out / "train_resume.log").read_text()) \
        if (out / "train_resume.log").is_file() else None
    metrics = _lines(run / "metrics.jsonl")
    summary = _json(run / "summary.json") or {}
    train = {"expected_steps": meta.get("train_steps"), "killed_after_checkpoint": meta.get("killed_at"),
             "resumed_at_step": int(resumed.group(1)) if resumed else None, "final_steps": summary.get("steps"),
             "nonfinite_steps": summary.get("nonfinite_steps"),
             "img_per_s": metrics[-1].get("img_per_s") if metrics else None,
             "last_L_val": metrics[-1].get("L_val") if metrics else None}
    train["ok"] = (train["resumed_at_step"] is not None and train["final_steps"] == train["expected_steps"])
    infer_stage = next((s for s in stages if s["stage"] == "infer"), None)
    n_rated = meta.get("rated_rows")
    infer = {"rows": n_rated, "seconds": infer_stage["seconds"] if infer_stage else None,
             "rows_per_s_end_to_end": (n_rated / infer_stage["seconds"]) if n_rated and infer_stage else None}
    benches = {p.stem: _json(p) for p in sorted(out.glob("bench*.json"))}
    main = _rows(benches.get("bench"))
    judged = not meta.get("dry_run") and (benches.get("bench") or {}).get("meta", {}).get("preset") == "paper"
    targets = []
    for name, key, field, op, goal in TARGETS:
        got = main.get(key, {}).get(field)
        ok = None if (not judged or got is None) else (got >= goal if op == ">=" else got <= goal)
        targets.append({"target": name, "goal": f"{op} {goal:g}", "measured": got, "ok": ok})
    return {"meta": meta, "stages": stages, "ok": all(s["rc"] == 0 for s in stages) and train["ok"],
            "train": train, "infer": infer, "targets": targets,
            "bench": {k: v["rows"] for k, v in benches.items() if v},
            "bench_meta": {k: v["meta"] for k, v in benches.items() if v}}


def _f(v: Any, spec: str = ",.1f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def markdown(rec: dict[str, Any]) -> str:
    m = rec["meta"]
    lines = [f"# Device check ({'dry run, CPU, toy size' if m.get('dry_run') else m.get('device', '')})", "",
             f"{m.get('device_name', '')}; torch {m.get('torch', '')}; overall: {'ok' if rec['ok'] else 'FAILED'}", "",
             "| stage | exit | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['rc']} | {s['seconds']:.1f} |" for s in rec["stages"]]
    t = rec["train"]
    lines += ["", "| training run (kill + resume) | |", "|---|---|",
              f"| steps expected / done | {_f(t['expected_steps'], 'd')} / {_f(t['final_steps'], 'd')} |",
              f"| killed after the checkpoint of step | {_f(t['killed_after_checkpoint'], 'd')} |",
              f"| resumed at step | {_f(t['resumed_at_step'], 'd')} |",
              f"| non-finite steps | {_f(t['nonfinite_steps'], 'd')} |",
              f"| img/s (whole resumed run, start-up included) | {_f(t['img_per_s'])} |",
              "", "| scoring run (infer_rater.sh) | |", "|---|---|",
              f"| rows rated | {_f(rec['infer']['rows'], 'd')} |",
              f"| rows/s end to end (start-up included) | {_f(rec['infer']['rows_per_s_end_to_end'])} |",
              "", "| target | goal | measured | met |", "|---|---|---|---|"]
    lines += [f"| {x['target']} | {x['goal']} | {_f(x['measured'], ',.2f')} | "
              f"{'—' if x['ok'] is None else ('yes' if x['ok'] else 'NO')} |" for x in rec["targets"]]
    for name, rows in rec["bench"].items():
        bm = rec["bench_meta"][name]
        lines += ["", f"`{name}`: preset {bm['preset']}, {bm['precision']}, bs {bm['bs']}, median of {bm['steps']}",
                  "", "| step | input | img/s | × plain | peak GiB | error |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['mode']} | {_f(r['img_per_s'])} | {_f(r['vs_plain'], '.2f')} | "
                  f"{_f(r['peak_mem_gib'], '.2f')} | {r['error']} |" for r in rows]
    return "\n".join(lines) + "\n"
