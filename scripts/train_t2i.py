#!/usr/bin/env python
"""Train the downstream text-to-image model (proxy architecture) on a subset.

python scripts/train_t2i.py --config configs/demo_t2i.json --train_csv_path=subset.csv [--key=value ...]
Multi-GPU: bash scripts/launch.sh scripts/train_t2i.py --config ...
"""
from __future__ import annotations

import sys

from alchemist.cli import config_main
from alchemist.config import T2IConfig


def run(cfg: T2IConfig) -> dict:
    from alchemist.evaluation.train import train_t2i  # heavy imports after the config is valid

    return train_t2i(cfg)


def main(argv: list[str] | None = None) -> int:
    return config_main(__doc__, T2IConfig, "configs/demo_t2i.json", run, argv)


if __name__ == "__main__":
    sys.exit(main())
