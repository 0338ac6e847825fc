#!/usr/bin/env python
"""The Python half of scripts/device_check.sh: its synthetic data set, and its report.

    python scripts/device_check.py fixture --preset paper --out DIR --n-train 512 --n-val 512 --n-score 2048 \\
        --train-steps 24 [--dry-run]
    python scripts/device_check.py report --out DIR [--killed-at STEP]

``fixture`` writes DIR/data (alchemist.bench.fixture), DIR/overrides.txt (the --key=value lines that
point a rater config at it) and DIR/meta.json (device, torch, what the check expects). ``report``
writes DIR/device_check.json and DIR/device_check.md (alchemist.bench.device_report), prints the
Markdown, and exits 1 when a stage failed or the resumed run did not finish.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def fixture(args) -> int:
    import torch

    from alchemist.bench.fixture import write_fixture
    from alchemist.bench.synthetic import PRESETS

    out = Path(args.out)
    over = write_fixture(PRESETS[args.preset], out / "data", args.n_train, args.n_val, args.n_score)
    (out / "overrides.txt").write_text("\n".join(over) + "\n")
    cuda = torch.cuda.is_available()
    meta = {"dry_run": args.dry_run, "preset": args.preset, "device": "cuda" if cuda else "cpu",
            "device_name": torch.cuda.get_device_name(0) if cuda else "CPU", "torch": torch.__version__,
            "train_steps": args.train_steps, "n_score": args.n_score}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return 0


def report(args) -> int:
    import pandas as pd

    from alchemist.bench.device_report import collect, markdown

    out = Path(args.out)
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    meta["killed_at"] = args.killed_at
    ratings = out / "ratings.parquet"
    meta["rated_rows"] = len(pd.read_parquet(ratings)) if ratings.is_file() else None
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    rec = collect(out)
    (out / "device_check.json").write_text(json.dumps(rec, indent=1))
    md = markdown(rec)
    (out / "device_check.md").write_text(md)
    print(md)
    return 0 if rec["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixture")
    f.add_argument("--preset", default="paper")
    f.add_argument("--out", required=True)
    f.add_argument("--n-train", type=int, default=512)
    f.add_argument("--n-val", type=int, default=512)
    f.add_argument("--n-score", type=int, default=2048)
    f.add_argument("--train-steps", type=int, default=24)
    f.add_argument("--dry-run", action="store_true")
    r = sub.add_parser("report")
    r.add_argument("--out", required=True)
    r.add_argument("--killed-at", type=int, default=None)
    args = ap.parse_args(argv)
    return fixture(args) if args.cmd == "fixture" else report(args)


if __name__ == "__main__":
    sys.exit(main())
