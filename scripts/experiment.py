#!/usr/bin/env python
"""Experiments on the demo data (after `make demo`); the logic lives in the experiments package.

    python scripts/experiment.py selection [--demo runs/demo] [--quick] [--rule-arms penalty] [--key=value ...]
        the selection experiment: downstream T2I models trained on full data, random 50 %, Shift-Gsample
        50 %, Top-K 50 %, the best heuristic's 50 %, random 20 % and Shift-Gsample 20 %, same epochs,
        several seeds; results.json, a loss-curve figure and a section of docs/results.md. Any
        --key=value it does not know goes to the T2I config. A rerun continues where it stopped.
    python scripts/experiment.py rules [--demo runs/demo] [--rules penalty,reference,lookahead] [--key=value ...]
        the rater-update rules compared: cost per step against a plain proxy step, and planted-defect
        AUROC of each rule's ratings (<demo>/rules/<rule>/); --key=value goes to the rater config
    python scripts/experiment.py downstream --sweep runs/sweep/demo [--seeds 0,1,2 --epochs 2 --jobs 2] [--key=value ...]
        full vs random 50 % vs Shift-Gsample 50 % vs Top-K 50 % at equal training steps on every seed of a
        sweep (scripts/demo.py sweep): held-out loss and caption gain, mean +- std (<sweep>/downstream.md)
    python scripts/experiment.py signal --run runs/sweep/digits/seed0
        AUROC per planted kind of the lookahead signal at a run's final proxy, beside the rater's
    python scripts/experiment.py trace --run runs/sweep/digits/seed0 --out runs/trace/d0 [--refit 4] [--key=value ...]
        reruns that run's rater recording the coefficient each step taught it for every pair; per planted
        kind and span of steps, the mean z-score of the coefficient and of the rater's logit (trace.md);
        --refit N: a fresh rater trained N passes on the recorded coefficients alone
    python scripts/experiment.py classifier --demo runs/demo/data --out runs/demo/attr_clf.pt
        the attribute classifier that judges GenEval-lite and FID-lite, with its held-out accuracy
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from alchemist.cli import ArgumentParser, UsageError, non_negative_int, user_errors


def selection_main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="experiment.py selection", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="runs/demo")
    ap.add_argument("--out", default="", help="experiment folder (default <demo>/experiment[_quick])")
    ap.add_argument("--ratings", default="", help="the rater's ratings (default <demo>/ratings.parquet)")
    ap.add_argument("--reference", default="", help="the same rater's ratings of the validation pairs, "
                    "Shift-Gsample's reference (default <demo>/val_ratings.parquet, unless --ratings is given)")
    ap.add_argument("--rules-dir", default="", help="<rule>/ratings.parquet per update rule (default <demo>/rules)")
    ap.add_argument("--config", default="configs/demo_t2i.json", help="the downstream T2I config")
    ap.add_argument("--epochs", type=int, default=None, help="epochs in every arm (default 8, which fits the demo in "
                    "about an hour on 2 CPU cores; 0 = the T2I config's optim.ep)")
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
    command = " ".join(["python", "scripts/experiment.py", "selection", *map(shlex.quote, argv)])
    from experiments.experiment import run_experiment
    from experiments.types import ExperimentConfig, quick_config

    kw = dict(demo=args.demo, out=args.out, ratings=args.ratings, reference=args.reference,
              rules_dir=args.rules_dir,
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
    print(f"{len(results['runs'])} runs in {results['seconds'] / 60:.1f} min -> {cfg.out_dir / 'results.json'}, "
          f"{cfg.doc_path}, {cfg.figure_path}")
    return 0


def rules_main(argv: list[str]) -> int:
    from alchemist.bilevel.estimators import ESTIMATORS
    from experiments.rules import compare_rules, format_rules_table

    ap = ArgumentParser(prog="experiment.py rules", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="runs/demo")
    ap.add_argument("--rules", default=",".join(ESTIMATORS))
    args, overrides = ap.parse_known_args(argv)
    print(format_rules_table(compare_rules(args.demo, args.rules.split(","), overrides)))
    return 0


def classifier_main(argv: list[str]) -> int:
    import torch

    from experiments.attributes import train_attribute_classifier

    ap = ArgumentParser(prog="experiment.py classifier", description="Train the demo attribute "
                        "classifier on the clean train rows of a demo folder plus freshly rendered clean "
                        "scenes; print its accuracy per attribute on the clean val split and the time taken.")
    ap.add_argument("--demo", required=True, help="demo data folder (scripts/demo.py data --out)")
    ap.add_argument("--out", required=True, help="classifier checkpoint to write")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--extra", type=int, default=10000, help="freshly rendered clean scenes added to training")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch's default); 1 is much faster on a busy machine")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    stats = train_attribute_classifier(args.demo, args.out, epochs=args.epochs, seed=args.seed, n_extra=args.extra)
    print(f"attribute classifier -> {args.out} ({stats['n_train']} training images, {args.epochs} epochs, "
          f"{stats['seconds']:.0f}s)")
    print(f"held-out accuracy on {stats['n_heldout']} clean val images:")
    for a, acc in stats["heldout_accuracy"].items():
        print(f"  {a:<10} {acc:6.1%}")
    return 0


def downstream_main(argv: list[str]) -> int:
    from experiments.downstream import run_downstream

    ap = ArgumentParser(prog="experiment.py downstream", description="Full vs random 50 % vs Shift-Gsample "
                        "50 % vs Top-K 50 % at equal training steps, on every seed of a sweep "
                        "(scripts/demo.py sweep); held-out loss and caption gain, mean +- std. Other "
                        "--key=value go to the T2I config.")
    ap.add_argument("--sweep", required=True, help="the sweep folder (seed<N>/ with data, tokenizer, ratings)")
    ap.add_argument("--bench", default="", help="name for the report (default: the folder's name)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the full arm; 50 %% arms get twice as many")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--config", default="configs/demo_t2i.json")
    args, overrides = ap.parse_known_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    run_downstream(args.sweep, args.bench or Path(args.sweep).name, seeds, args.epochs, args.jobs, overrides,
                   args.config)
    return 0


def signal_main(argv: list[str]) -> int:
    from experiments.signal import final_signal

    ap = ArgumentParser(prog="experiment.py signal", description="AUROC per planted kind of the lookahead "
                        "coefficient at a rater run's final proxy, beside the rater's own AUROC.")
    ap.add_argument("--run", required=True, help="a demo-layout run folder (data/, rater/, ratings.parquet)")
    ap.add_argument("--n-val", type=int, default=400, help="validation pairs in the gradient")
    ap.add_argument("--proxy-steps", type=int, default=0, help="plain steps of a copy of the proxy first "
                    "(bilevel.distill_proxy_steps)")
    ap.add_argument("--captions", type=int, default=0, help="also the caption agreement over this many other "
                    "captions, and the combined target (bilevel.distill_captions)")
    ap.add_argument("--snapshots", type=int, default=1, help="signals averaged over this many points of the "
                    "further steps (bilevel.distill_snapshots)")
    args = ap.parse_args(argv)
    print(final_signal(args.run, args.n_val, proxy_steps=args.proxy_steps, captions=args.captions,
                       snapshots=args.snapshots).round(3).to_string())
    return 0


def trace_main(argv: list[str]) -> int:
    from experiments.trace import coefficient_trace

    ap = ArgumentParser(prog="experiment.py trace", description="Rerun a run's rater recording what every "
                        "step taught it, per planted kind; other --key=value go to the rater config.")
    ap.add_argument("--run", required=True, help="a demo-layout run folder (data/, tokenizer.pt, rater/)")
    ap.add_argument("--out", required=True, help="folder for the rerun, trace.parquet and trace.md")
    ap.add_argument("--spans", type=int, default=4, help="spans of steps the tables average over")
    ap.add_argument("--refit", type=int, default=0, help="passes of a fresh rater refit on the trace alone")
    args, overrides = ap.parse_known_args(argv)
    print(coefficient_trace(args.run, args.out, overrides, args.spans, args.refit))
    return 0


COMMANDS = {"selection": selection_main, "rules": rules_main, "classifier": classifier_main,
            "downstream": downstream_main, "signal": signal_main, "trace": trace_main}


@user_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        raise UsageError(f"name one of {', '.join(COMMANDS)} first (experiment.py --help describes them)")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
