#!/usr/bin/env python
"""The demo on generated data, on a CPU, in minutes (the pipeline is `make demo`).

    python scripts/demo.py [--out runs/demo] [--n-train 2000 ...] [--key=value ...]
        the whole pipeline: 1 demo dataset -> 2 tokenizer -> 3 rater (bilevel) -> 4 scores ->
        5 Shift-Gsample 50 % subset -> 6 pictures -> 7 where each planted kind landed;
        any other --key=value goes to the rater config (configs/demo_rater.json), e.g. --estimator=penalty
    python scripts/demo.py data --out DIR [--n-train 2000 --rate-noise 0.1 ... --force]
        only the demo dataset: images/*.png, train.csv, val.csv, defects.csv (ground truth), spec.json
    python scripts/demo.py --bench digits --out runs/digits
        the same pipeline on the second benchmark: real handwritten-digit scans with the same planted kinds
    python scripts/demo.py sweep --bench demo|digits [--seeds 0,1,2 --jobs 2 --out runs/sweep/<bench>] [--key=value ...]
        the whole rating pipeline once per seed (one process each, --jobs at a time), then each planted
        kind's AUROC and Shift-Gsample keep rate as mean +- std (<out>/sweep.md, sweep.json)
    python scripts/demo.py generation [--out runs/demo] [--grid PNG] [--key=value ...]
        dataset -> tokenizer -> a T2I model (configs/demo_t2i.json, <out>/t2i) -> a sample grid;
        any other --key=value goes to the T2I config

Every stage reuses its output when it is already there (models resume from their last checkpoint),
so a rerun continues where it stopped. The logic lives in experiments/demo.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from alchemist.cli import ArgumentParser, non_negative_int, user_errors
from experiments.demo_data import DemoSpec, format_summary, generate_demo
from experiments.types import BENCHMARKS

BUNDLED_TOKENIZER = "configs/demo_tokenizer.pt"  # what `make demo` (--threads 2) trains on the seed-0 demo images


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="runs/demo", help="folder for every demo output")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--tokenizer-steps", type=int, default=800)


def pipeline_main(argv: list[str]) -> None:
    from experiments.demo import run_demo

    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(ap)
    ap.add_argument("--retention", type=float, default=0.5)
    ap.add_argument("--bench", choices=BENCHMARKS, default="demo", help="demo: generated scenes; digits: real scans")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (results depend on the count)")
    ap.add_argument("--tokenizer", default="", help="a bundled finished tokenizer, used instead of training one "
                    "when it was trained on exactly these images (make demo: " + BUNDLED_TOKENIZER + ")")
    args, overrides = ap.parse_known_args(argv)
    run_demo(args.out, args.n_train, args.n_val, args.seed, args.tokenizer_steps, args.retention, overrides,
             bench=args.bench, threads=args.threads, tokenizer=args.tokenizer)


def sweep_main(argv: list[str]) -> None:
    from experiments.sweep import run_sweep

    ap = ArgumentParser(prog="demo.py sweep", description="The rating pipeline over seeds: planted-kind "
                        "AUROC and Shift-Gsample keep rates as mean +- std. Other --key=value go to every "
                        "seed's rater config.")
    ap.add_argument("--bench", choices=BENCHMARKS, default="demo")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--jobs", type=int, default=2, help="seeds run at once (one torch thread each)")
    ap.add_argument("--out", default="", help="default runs/sweep/<bench>")
    args, overrides = ap.parse_known_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    run_sweep(args.bench, seeds, args.out or f"runs/sweep/{args.bench}", args.jobs, overrides)


def data_main(argv: list[str]) -> None:
    ap = ArgumentParser(prog="demo.py data", description="Generate the demo dataset; an existing output "
                        "with the same spec is reused unless --force.")
    ap.add_argument("--out", required=True, help="output folder")
    for f in dataclasses.fields(DemoSpec):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                        help=f"default {f.default}")
    ap.add_argument("--force", action="store_true", help="regenerate even if OUT holds the same spec")
    args = ap.parse_args(argv)
    spec = DemoSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSpec)})
    print(format_summary(generate_demo(args.out, spec, force=args.force)))


def generation_main(argv: list[str]) -> None:
    from experiments.demo import run_generation

    ap = ArgumentParser(prog="demo.py generation", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(ap)
    ap.add_argument("--grid", default="", help="PNG path (default <out>/samples.png)")
    ap.add_argument("--rows", type=int, default=8, help="val captions in the grid")
    ap.add_argument("--samples", type=int, default=4, help="samples per caption")
    args, overrides = ap.parse_known_args(argv)
    run_generation(args.out, args.n_train, args.n_val, args.seed, args.tokenizer_steps, args.grid, args.rows,
                   args.samples, overrides)


@user_errors
def main(argv: list[str] | None = None) -> int | None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"data": data_main, "generation": generation_main, "sweep": sweep_main}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return pipeline_main(argv)


if __name__ == "__main__":
    sys.exit(main())
