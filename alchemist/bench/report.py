"""The benchmark's records (one ``Row`` per measured step, a ``Result`` per run) and their tables."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    kind: str  # bilevel | plain | score
    mode: str  # raw | cache | tokens
    rule: str  # penalty | reference | lookahead | "" (plain, score)
    images: int  # images per step
    seconds: float = math.nan  # median
    seconds_min: float = math.nan  # the least disturbed step (a shared host's noise only adds time)
    img_per_s: float = math.nan
    peak_mem_gib: float = math.nan
    gflop: float = math.nan  # model FLOPs of one step
    tflops: float = math.nan  # achieved
    mfu: float = math.nan  # achieved / peak (nan without a peak rate)
    vs_plain: float = math.nan  # bilevel s/step ÷ plain s/step in the same mode
    error: str = ""

    @property
    def label(self) -> str:
        return {"bilevel": f"bilevel {self.rule}", "plain": "plain proxy", "score": "rater scoring"}[self.kind]


@dataclass
class Result:
    meta: dict[str, Any]
    flops_per_image: dict[str, int]
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        return {"meta": self.meta, "flops_per_image": self.flops_per_image,
                "rows": [{"label": r.label, **{k: clean(v) for k, v in dataclasses.asdict(r).items()}}
                         for r in self.rows]}


def _f(v: float, spec: str) -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, spec)


def format_row(r: Row) -> str:
    if r.error:
        return f"{r.label} [{r.mode}]: {r.error}"
    return (f"{r.label} [{r.mode}]: {r.seconds:.4f} s/step, {r.img_per_s:.1f} img/s, "
            f"{r.peak_mem_gib:.2f} GiB" + (f", ×{r.vs_plain:.2f} plain" if math.isfinite(r.vs_plain) else ""))


def format_table(result: Result) -> str:
    """Markdown: the timing table, then the FLOPs per image."""
    meta, gpu = result.meta, result.meta["device"] == "cuda"
    rate = "TFLOP/s" if gpu else "GFLOP/s"
    scale = 1.0 if gpu else 1e3
    mem = "peak alloc GiB" if gpu else "peak RSS GiB"
    head = ["step", "input", "imgs/step", "s/step", "min s/step", "img/s", "× plain", "GFLOP/step", rate, "MFU", mem]
    lines = [f"preset `{meta['preset']}` on {meta['device_name']} ({meta['precision']}), torch {meta['torch']}; "
             f"median of {meta['steps']} steps after {meta['warmup']} warm-up; bs {meta['bs']} (+{meta['bs']} val "
             f"for bilevel), scoring batch {meta['score_bs']}, {meta['tokens']} tokens, captions padded to "
             f"{meta['text_len']}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        cells = [r.label, r.mode, str(r.images)]
        if r.error:
            cells += [r.error] + [""] * (len(head) - 4)
        else:
            cells += [_f(r.seconds, ".4f"), _f(r.seconds_min, ".4f"), _f(r.img_per_s, ",.1f"), _f(r.vs_plain, ".2f"),
                      _f(r.gflop, ",.1f"), _f(r.tflops * scale, ",.1f"), _f(r.mfu * 100, ".1f") + ("%" if math.isfinite(r.mfu) else ""),
                      _f(r.peak_mem_gib, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| per image | GFLOP |", "|---|---|"]
    lines += [f"| {k} | {v / 1e9:,.3f} |" for k, v in result.flops_per_image.items()]
    return "\n".join(lines)


def format_flops(summary: dict[str, Any]) -> str:
    lines = ["| per image | GFLOP |", "|---|---|"]
    lines += [f"| {k} | {v / 1e9:,.1f} |" for k, v in summary["per_image"].items()]
    lines += ["", f"| step | input | imgs | TFLOP/step | floor s/step at {summary['peak_tflops']:g} TFLOP/s "
                  "| ceiling img/s | img/s at 35 % MFU |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['mode']} | {r['images']} | {r['tflop']:,.2f} | {r['floor_s']:.4f} "
              f"| {r['ceiling_img_per_s']:,.0f} | {r['img_per_s_at_35pct_mfu']:,.0f} |" for r in summary["steps"]]
    return "\n".join(lines)
