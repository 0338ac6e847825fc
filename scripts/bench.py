#!/usr/bin/env python
"""Benchmark rater training and scoring: s/step, img/s, peak memory, model FLOPs and MFU.

    python scripts/bench.py --preset cpu                         # tiny, any CPU, about a minute
    python scripts/bench.py --preset paper --json perf.json      # paper scale, on one GPU
    python scripts/bench.py --preset paper --flops-only          # FLOPs and time floors, no device needed
    python scripts/bench.py prune --n 30000000 --table --out runs/bench_prune.json   # pruning at scale
    python scripts/bench.py prune --n 30000000 --cases shards          # only the streaming prune of per-shard files
    python scripts/bench.py score --n 20000 1000000 --out runs/bench_score.json   # scoring engines: torch, ray

Rows: the bilevel rater-training step for each rule (penalty, reference, lookahead) and the plain
proxy step it is compared with, each from raw images (tokenizer + text encoder inside the step),
from the feature cache (ids + text features on the host) and from device-resident TokenBatches;
then rater scoring (batch 256 at paper scale, inference_mode) in the same three modes. Models,
images and captions are synthetic (random weights: nothing is downloaded or read). Any
``--key=value`` is a RaterConfig override, e.g. ``--bs=32`` or ``--fp16=0``. See docs/performance.md.
``prune``: time and peak memory of every pruning strategy on N rows, each case in a fresh process
(``alchemist.bench.prune``; docs/selection.md). ``score``: rows/s and peak memory of ``infer_rater.py``
with each engine on N synthetic pairs in webdataset shards, tiny rater (``alchemist.bench.scoring``;
docs/performance.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from alchemist.cli import ArgumentParser, user_errors
from alchemist.utils.io import atomic_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def prune_main(argv: list[str]) -> None:
    """No torch in this process: a case's child inherits the parent's peak RSS through fork/exec."""
    from alchemist.bench.prune import run_prune_benchmark

    ap = ArgumentParser(prog="bench.py prune", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30_000_000)
    ap.add_argument("--retention", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--table", action="store_true", help="also prune a synthetic N-row parquet end to end")
    ap.add_argument("--cases", default="", help="comma-separated subset of select,table,shards (default: select, "
                    "and table,shards with --table)")
    ap.add_argument("--out", default="", help="write all results as JSON here")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c] or ["select", "table", "shards"]
    results = run_prune_benchmark(args.n, args.retention, args.table or bool(args.cases), cases)
    if args.out:
        with atomic_open(args.out) as f:
            json.dump(results, f, indent=1)


def score_main(argv: list[str]) -> None:
    from alchemist.bench.scoring import main_json, run_scoring_benchmark

    ap = ArgumentParser(prog="bench.py score", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 20000], help="pairs to score (two sizes: the fixed "
                    "cost and the per-row rate are fitted from the two largest)")
    ap.add_argument("--engines", default="torch,ray")
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=1, help="torch engine: DataLoader workers")
    ap.add_argument("--out", default="", help="write all results as JSON here")
    args = ap.parse_args(argv)
    results = run_scoring_benchmark(args.n, [e for e in args.engines.split(",") if e], args.bs, args.num_workers)
    if args.out:
        main_json(results, args.out)


@user_errors
def main(argv: list[str] | None = None) -> int | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prune"]:
        return prune_main(argv[1:])
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    import torch

    from alchemist.bench.flops import H100_BF16_DENSE_TFLOPS, RULES, flops_summary
    from alchemist.bench.harness import run_benchmark
    from alchemist.bench.report import format_flops, format_table
    from alchemist.bench.synthetic import MODES, PRESETS, bench_config

    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--rules", default=",".join(RULES), help="comma-separated subset of %(default)s")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of %(default)s")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (median; preset default)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before each row (preset default)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"the device's peak rate for MFU (default on a GPU: {H100_BF16_DENSE_TFLOPS:g}, "
                         "H100 SXM bf16 dense; a CPU gets no MFU unless given)")
    ap.add_argument("--score-bs", type=int, default=None, help="scoring batch (preset default: 256 at paper scale)")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (preset default)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--flops-only", action="store_true",
                    help="only count FLOPs at the preset's scale (meta device) and print the time floors")
    args, overrides = ap.parse_known_args(argv)
    preset = PRESETS[args.preset]
    if args.score_bs:
        preset = dataclasses.replace(preset, score_bs=args.score_bs)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    if args.flops_only:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            cfg = bench_config(preset, tmp, overrides)
        summary = flops_summary(cfg, preset, text_len=cfg.model.text_max_len,
                                   peak_tflops=args.peak_tflops or H100_BF16_DENSE_TFLOPS)
        print(format_flops(summary))
        out = summary
    else:
        threads = args.threads or preset.threads
        if threads and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        result = run_benchmark(preset, rules=[r for r in args.rules.split(",") if r],
                                  modes=[m for m in args.modes.split(",") if m], steps=args.steps,
                                  warmup=args.warmup, peak_tflops=args.peak_tflops, overrides=overrides,
                                  log=lambda s: print(s, file=sys.stderr, flush=True))
        print(format_table(result))
        out = result.to_dict()
    if args.json:
        with atomic_open(args.json) as f:
            json.dump(out, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
