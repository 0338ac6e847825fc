#!/usr/bin/env python
"""Generate images for captions of a pairs table with a trained T2I (or rater-run) proxy and write
a PNG grid: the real image, then K samples, one row per caption.

python scripts/sample_grid.py --run runs/demo/t2i --csv runs/demo/data/val.csv --out grid.png [--n 8 --k 4 --cfg 4]
"""
from __future__ import annotations

import argparse
import sys

import torch

from alchemist.build import build_proxy, build_text_encoder, build_tokenizer
from alchemist.config import ConfigError, T2IConfig, config_from_dict
from alchemist.data.pairs import DataError, PairsDataset, load_pairs
from alchemist.plots import plot_samples
from alchemist.utils.checkpoint import latest_checkpoint, load_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder (latest checkpoint) or a checkpoint file")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=8, help="captions (rows)")
    ap.add_argument("--k", type=int, default=4, help="samples per caption")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the run's model.cfg)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        path = args.run if args.run.endswith(".pt") else latest_checkpoint(args.run)
        if path is None:
            raise FileNotFoundError(f"no checkpoint under {args.run!r}")
        ckpt = load_checkpoint(path)
        cfg = config_from_dict(T2IConfig, {k: v for k, v in ckpt["config"].items() if k != "bilevel"})
        device = torch.device("cpu")
        vqvae, text = build_tokenizer(cfg.model, device), build_text_encoder(cfg.model, device)
        proxy = build_proxy(cfg.model, text.width, device)
        proxy.load_state_dict(ckpt["proxy"])
        proxy.eval()
        table = load_pairs(args.csv, cfg.data).sample(n=args.n, random_state=args.seed).reset_index(drop=True)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ds = PairsDataset(table, cfg.data.image_size)
    real = torch.stack([ds[i]["img_3HW"] for i in range(len(ds))])
    captions = table["caption"].tolist()
    cond = text([c for c in captions for _ in range(args.k)])
    uncond = text([""])
    m = cfg.model
    gen = proxy.generate(vqvae, cond, uncond, cfg=m.cfg if args.cfg is None else args.cfg, top_k=m.top_k,
                         top_p=m.top_p, seed=args.seed)
    out = plot_samples(real, gen.view(len(captions), args.k, *gen.shape[1:]), captions, args.out,
                       title=f"{path} (cfg {m.cfg if args.cfg is None else args.cfg})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
