"""The shape every training CLI shares: --config FILE plus --key=value overrides, one job, and a
user error as one line on stderr (exit 2) instead of a traceback."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from alchemist.config import ConfigError, load_config
from alchemist.data.pairs import DataError


def config_main(doc: str, config_cls: type, default_config: str, run: Callable[[Any], dict],
                argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Any config key can be overridden: --bs=32 --model.depth=8")
    ap.add_argument("--config", default=default_config)
    args, overrides = ap.parse_known_args(argv)
    try:
        summary = run(load_config(config_cls, args.config, overrides))
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
