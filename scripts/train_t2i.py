#!/usr/bin/env python
"""Train the downstream text-to-image model (proxy architecture) on a subset.

python scripts/train_t2i.py --config configs/demo_t2i.json --train_csv_path=subset.csv [--key=value ...]
Multi-GPU: bash scripts/launch.sh scripts/train_t2i.py --config ...
"""
from __future__ import annotations

import argparse
import json
import sys

from alchemist.config import ConfigError, T2IConfig, load_config
from alchemist.data.pairs import DataError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo_t2i.json")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(T2IConfig, args.config, overrides)
        from alchemist.evaluation.train import train_t2i

        summary = train_t2i(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
