"""Look at what a trained T2I run generates: a grid of samples beside the real images of their captions."""
from __future__ import annotations

from pathlib import Path

import torch

from alchemist.build import build_proxy, build_text_encoder, build_tokenizer
from alchemist.config import T2IConfig, config_from_dict
from alchemist.data.pairs import PairsDataset, load_pairs
from alchemist.plots import plot_samples
from alchemist.utils.checkpoint import latest_checkpoint, load_checkpoint


def load_t2i_run(run: str | Path, device: torch.device | str = "cpu"):
    """(checkpoint path, config, proxy, tokenizer, text encoder) from a run folder's latest checkpoint or a file.

    Works for rater runs too (their proxy), whose bilevel section a T2I config does not have.
    """
    run = Path(run)
    path = run if run.is_file() else latest_checkpoint(run)
    if path is None:
        raise FileNotFoundError(f"no checkpoint under {str(run)!r}")
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(T2IConfig, {k: v for k, v in ckpt["config"].items() if k != "bilevel"})
    device = torch.device(device)
    vqvae, text = build_tokenizer(cfg.model, device), build_text_encoder(cfg.model, device)
    proxy = build_proxy(cfg.model, text.width, device)
    proxy.load_state_dict(ckpt["proxy"])
    return Path(path), cfg, proxy.eval(), vqvae, text


@torch.no_grad()
def sample_grid(run: str | Path, table_path: str | Path, out: str | Path, n: int = 8, k: int = 4,
                cfg_scale: float | None = None, seed: int = 0) -> Path:
    """PNG: `n` random captions of the table (seeded), each with its real image and `k` samples."""
    path, cfg, proxy, vqvae, text = load_t2i_run(run)
    table = load_pairs(table_path, cfg.data)
    table = table.sample(n=min(n, len(table)), random_state=seed).reset_index(drop=True)
    ds = PairsDataset(table, cfg.data.image_size)
    real_B3HW = torch.stack([ds[i]["img_3HW"] for i in range(len(ds))])
    captions = table["caption"].tolist()
    m = cfg.model
    scale = m.cfg if cfg_scale is None else cfg_scale
    gen = proxy.generate(vqvae, text([c for c in captions for _ in range(k)]), text([""]), cfg=scale,
                         top_k=m.top_k, top_p=m.top_p, seed=seed)
    return plot_samples(real_B3HW, gen.view(len(captions), k, *gen.shape[1:]), captions, out,
                        title=f"{path.parent.parent.name}/{path.name}, cfg {scale:g}")
