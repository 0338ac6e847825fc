#!/usr/bin/env python
"""Encode token ids and text features of the train and val tables once, into data.cache_dir.

python scripts/precompute.py --config configs/config_rater.json --cache_dir=cache/ [--key=value ...]
Multi-GPU: bash scripts/launch.sh scripts/precompute.py --config ... (ranks split the
shards). Rerunning finishes what a killed run left; then train with the same --cache_dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alchemist.build import build_text_encoder, build_tokenizer
from alchemist.cli import ArgumentParser, user_errors
from alchemist.config import ConfigError, RaterConfig, load_config
from alchemist.data.cache import build_cache
from alchemist.data.pairs import SkipLog, load_pairs
from alchemist.utils.dist import state as dist_state
from alchemist.utils.io import check_writable


@user_errors
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/config_rater.json")
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(RaterConfig, args.config, overrides)
    if not cfg.data.cache_dir:
        raise ConfigError("set data.cache_dir (e.g. --cache_dir=cache/) to say where the cache goes")
    check_writable(cfg.data.cache_dir)
    ps = dist_state()
    vqvae = build_tokenizer(cfg.model, ps.device)
    text = build_text_encoder(cfg.model, ps.device)
    for split, path in (("val", cfg.data.val_csv_path), ("train", cfg.data.train_csv_path)):
        table = load_pairs(path, cfg.data, SkipLog())
        out = build_cache(table, Path(cfg.data.cache_dir) / split, vqvae, text, cfg.data.image_size,
                          shard_size=args.shard_size, num_workers=cfg.data.num_workers, dtype=args.dtype,
                          rank=ps.process_index, world=ps.num_processes, device=ps.device)
        print(f"{split}: {len(table)} rows cached in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
