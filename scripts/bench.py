#!/usr/bin/env python
"""Benchmark rater training and scoring: s/step, img/s, peak memory, model FLOPs and MFU.

    python scripts/bench.py --preset cpu                         # tiny, any CPU, about a minute
    python scripts/bench.py --preset paper --json perf.json      # paper scale, on one GPU
    python scripts/bench.py --preset paper --flops-only          # FLOPs and time floors, no device needed

Rows: the bilevel rater-training step for each rule (penalty, reference, lookahead) and the plain
proxy step it is compared with, each from raw images (tokenizer + text encoder inside the step),
from the feature cache (ids + text features on the host) and from device-resident TokenBatches;
then rater scoring (batch 256 at paper scale, inference_mode) in the same three modes. Models,
images and captions are synthetic (random weights: nothing is downloaded or read). Any
``--key=value`` is a RaterConfig override, e.g. ``--bs=32`` or ``--fp16=0``. See docs/performance.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from alchemist import benchmark as bm  # noqa: E402
from alchemist.utils.io import atomic_open  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(bm.PRESETS), default="cpu")
    ap.add_argument("--rules", default=",".join(bm.RULES), help="comma-separated subset of %(default)s")
    ap.add_argument("--modes", default=",".join(bm.MODES), help="comma-separated subset of %(default)s")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (median; preset default)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before each row (preset default)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"the device's peak rate for MFU (default on a GPU: {bm.H100_BF16_DENSE_TFLOPS:g}, "
                         "H100 SXM bf16 dense; a CPU gets no MFU unless given)")
    ap.add_argument("--score-bs", type=int, default=None, help="scoring batch (preset default: 256 at paper scale)")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (preset default)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--flops-only", action="store_true",
                    help="only count FLOPs at the preset's scale (meta device) and print the time floors")
    args, overrides = ap.parse_known_args(argv)
    preset = bm.PRESETS[args.preset]
    if args.score_bs:
        preset = dataclasses.replace(preset, score_bs=args.score_bs)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    if args.flops_only:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            cfg = bm.bench_config(preset, tmp, overrides)
        summary = bm.flops_summary(cfg, preset, text_len=cfg.model.text_max_len,
                                   peak_tflops=args.peak_tflops or bm.H100_BF16_DENSE_TFLOPS)
        print(bm.format_flops(summary))
        out = summary
    else:
        threads = args.threads or preset.threads
        if threads and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        result = bm.run_benchmark(preset, rules=[r for r in args.rules.split(",") if r],
                                  modes=[m for m in args.modes.split(",") if m], steps=args.steps,
                                  warmup=args.warmup, peak_tflops=args.peak_tflops, overrides=overrides,
                                  log=lambda s: print(s, file=sys.stderr, flush=True))
        print(bm.format_table(result))
        out = result.to_dict()
    if args.json:
        with atomic_open(args.json) as f:
            json.dump(out, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
