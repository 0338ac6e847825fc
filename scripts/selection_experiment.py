#!/usr/bin/env python
"""The selection experiment on the demo: downstream T2I models trained on full data, random 50 %,
Shift-Gsample 50 %, Top-K 50 %, the best heuristic's 50 %, random 20 % and Shift-Gsample 20 %,
same epochs, several seeds; results.json, a loss-curve figure and a section of docs/results.md.

Needs the demo pipeline's outputs (`make demo`: <demo>/data, tokenizer.pt, ratings.parquet).
python scripts/selection_experiment.py [--demo runs/demo] [--rules-dir runs/demo/rules] [--quick] [--key=value ...]
Any --key=value the script does not know goes to the T2I config (e.g. --bs=16 --depth=2).
Rerunning continues: finished runs are not retrained, unfinished ones resume.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from alchemist.config import ConfigError
from alchemist.data.pairs import DataError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="runs/demo")
    ap.add_argument("--out", default="", help="experiment folder (default <demo>/experiment[_quick])")
    ap.add_argument("--ratings", default="", help="the rater's ratings (default <demo>/ratings.parquet)")
    ap.add_argument("--rules-dir", default="", help="<rule>/ratings.parquet per update rule (default <demo>/rules)")
    ap.add_argument("--config", default="configs/demo_t2i.json", help="the downstream T2I config")
    ap.add_argument("--epochs", type=int, default=None, help="epochs in every arm (default 8, which fits the demo in about an "
                    "hour on 2 CPU cores; 0 = the T2I config's optim.ep)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1)")
    ap.add_argument("--heuristics", choices=["auroc", "all"], default="auroc",
                    help="auroc: one heuristic arm, the best by planted-defect AUROC; all: all three")
    ap.add_argument("--rule-arms", default="", help="comma-separated update rules whose raters also get a "
                    "Shift-Gsample 50 %% arm (their ratings in --rules-dir), e.g. penalty")
    ap.add_argument("--n-generate", type=int, default=None, help="val captions to generate for (default 200)")
    ap.add_argument("--no-cache", action="store_true", help="encode images every epoch instead of once")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (0 = torch's default)")
    ap.add_argument("--doc", default=None, help="Markdown file whose section is written "
                    "(default docs/results.md; --quick: <out>/results.md)")
    ap.add_argument("--figure", default="", help="loss-curve PNG (default beside the doc, in figures/)")
    ap.add_argument("--quick", action="store_true", help="CI-size smoke run: 1 epoch, depth 1, 8 images")
    args, overrides = ap.parse_known_args(argv)
    command = " ".join(["python", "scripts/selection_experiment.py", *map(shlex.quote, sys.argv[1:] if argv is None
                                                                           else argv)])
    try:
        from alchemist.evaluation.experiment import ExperimentConfig, quick_config, run_experiment

        kw = dict(demo=args.demo, out=args.out, ratings=args.ratings, rules_dir=args.rules_dir,
                  t2i_config=args.config, t2i_overrides=tuple(overrides), heuristics=args.heuristics,
                  cache=not args.no_cache, jobs=args.jobs, threads=args.threads, figure=args.figure)
        if args.epochs is not None:
            kw["epochs"] = args.epochs
        if args.seeds is not None:
            kw["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        if args.rule_arms:
            kw["rule_arms"] = tuple(r.strip() for r in args.rule_arms.split(",") if r.strip())
        if args.n_generate is not None:
            kw["n_generate"] = args.n_generate
        if args.doc is not None:
            kw["doc"] = args.doc
        cfg = quick_config(**kw) if args.quick else ExperimentConfig(**kw)
        results = run_experiment(cfg, command=command)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(results['runs'])} runs in {results['seconds'] / 60:.1f} min -> {cfg.out_dir / 'results.json'}, "
          f"{cfg.doc_path}, {cfg.figure_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
