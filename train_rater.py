"""Train the rater jointly with the proxy (bilevel).  python train_rater.py --config configs/config_rater.json [--key=value ...]"""
from __future__ import annotations

import argparse
import json
import sys

from alchemist.config import ConfigError, RaterConfig, load_config
from alchemist.data.pairs import DataError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, epilog="Any config key can be overridden: --bs=32 --model.depth=8")
    ap.add_argument("--config", default="configs/config_rater.json")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(RaterConfig, args.config, overrides)
        from alchemist.bilevel.launch import train_rater

        summary = train_rater(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
