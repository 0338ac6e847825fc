#!/usr/bin/env python
"""Train a small VAR-style multi-scale tokenizer on the images of a pairs table (CSV/parquet).

Offline there are no pretrained tokenizer weights; this makes one, e.g. for the CPU demo:
    python scripts/train_tokenizer.py --csv runs/demo/data/train.csv --out runs/demo/tokenizer.pt
The defaults are the demo's tokenizer (configs/demo_*.json): 32 px, an 8x8 latent, patch_nums 1,2,4,8.
The checkpoint stores its constructor config, so `load_vqvae(out)` needs no arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from alchemist.cli import ArgumentParser, UsageError, non_negative_int, user_errors
from alchemist.models.vqvae import VQVAE
from alchemist.tokenizer_training import reconstruction_mse, train_vqvae_on_pairs
from alchemist.utils.io import check_writable


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(","))


@user_errors
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", required=True, help="pairs table with an image path column")
    ap.add_argument("--val-csv", default="", help="held-out pairs table: report its reconstruction MSE at the end")
    ap.add_argument("--out", required=True, help="checkpoint file to write (metrics go to <out>.jsonl)")
    ap.add_argument("--image-size", type=int, default=None, help="default: last patch_num x downsampling")
    ap.add_argument("--patch-nums", type=_ints, default=(1, 2, 4, 8))
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--cvae", type=int, default=16)
    ap.add_argument("--ch", type=int, default=32)
    ap.add_argument("--ch-mult", type=_ints, default=(1, 2, 2))
    ap.add_argument("--num-res-blocks", type=int, default=1)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--recon", choices=("l2", "l1"), default="l2")
    ap.add_argument("--no-restart", action="store_true", help="disable dead-code restart")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model = VQVAE(vocab_size=args.vocab, z_channels=args.cvae, ch=args.ch, ch_mult=args.ch_mult,
                  num_res_blocks=args.num_res_blocks, patch_nums=args.patch_nums)
    size = args.image_size or model.image_size
    if size != model.image_size:
        raise UsageError(f"--image-size {size} does not fit the tokenizer: patch_nums[-1] x 2^(len(ch_mult)-1) = "
                         f"{model.image_size}; change --image-size, --patch-nums or --ch-mult")
    check_writable(Path(args.out).resolve().parent)
    stats = train_vqvae_on_pairs(model, args.csv, args.steps, bs=args.bs, lr=args.lr, out_path=args.out,
                                 workers=args.workers, seed=args.seed, device=args.device, recon=args.recon,
                                 restart_dead=not args.no_restart)
    print(f"tokenizer: {stats['images']} images, {args.steps} steps in {stats['time_s']:.0f}s; recon MSE "
          f"{stats['recon_mse']:.4f}, codebook usage {stats['usage']:.0%}, perplexity {stats['perplexity']:.0f} "
          f"-> {args.out}")
    if args.val_csv:
        stats["val_mse"] = reconstruction_mse(model, args.val_csv, device=args.device)
        print(f"held-out reconstruction MSE {stats['val_mse']:.4f} ({args.val_csv})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
