"""Train the rater jointly with the proxy (bilevel).

python train_rater.py --config configs/config_rater.json [--key=value ...]
"""
from __future__ import annotations

import sys

from alchemist.cli import config_main
from alchemist.config import RaterConfig


def run(cfg: RaterConfig) -> dict:
    from alchemist.bilevel.launch import train_rater  # heavy imports after the config is valid

    return train_rater(cfg)


def main(argv: list[str] | None = None) -> int:
    return config_main(__doc__, RaterConfig, "configs/config_rater.json", run, argv)


if __name__ == "__main__":
    sys.exit(main())
