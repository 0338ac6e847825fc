"""Training a tokenizer on the images of a pairs table: the part of tokenizer training that reads data.

``alchemist.models.vqvae_train`` trains a VQVAE on any stream of image batches and knows nothing of
tables; this module sits above both it and ``alchemist.data`` and feeds it a pairs table's images.
``train_tokenizer_for`` makes the tokenizer a config's geometry asks for (the demo's; no pretrained
VQ weights exist offline).
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from alchemist.config import DataConfig, ModelConfig
from alchemist.data.pairs import PairsDataset, collate_pairs, load_pairs
from alchemist.models.vqvae import VQVAE
from alchemist.models.vqvae_train import train_vqvae
from alchemist.utils.io import atomic_torch_save


def train_vqvae_on_pairs(model: VQVAE, table_path: str | Path, steps: int, *, bs: int = 16, lr: float = 2e-3,
                         out_path: str | Path | None = None, workers: int = 0, seed: int = 0,
                         device: str | torch.device = "cpu", **kw) -> dict[str, Any]:
    """`train_vqvae` on the images of a pairs table (CSV/parquet) at the model's own image size."""
    ds = pairs_images(table_path, model.image_size)
    loader = DataLoader(ds, batch_size=bs, shuffle=True, drop_last=len(ds) >= bs, num_workers=workers,
                        collate_fn=collate_pairs, generator=torch.Generator().manual_seed(seed))
    stats = train_vqvae(model, loader, steps=steps, lr=lr, device=device, out_path=out_path, seed=seed, **kw)
    return {**stats, "images": len(ds)}


def pairs_images(table_path: str | Path, size: int) -> PairsDataset:
    """The images of a pairs table, read at `size` (a tokenizer needs no caption settings)."""
    return PairsDataset(load_pairs(table_path, DataConfig(train_csv_path=str(table_path), image_size=size)), size)


@torch.no_grad()
def reconstruction_mse(model: VQVAE, table_path: str | Path, bs: int = 64,
                       device: str | torch.device = "cpu") -> float:
    """Mean squared error of encode → quantise → decode (clamped to [-1, 1]) over every image of a pairs table."""
    ds = pairs_images(table_path, model.image_size)
    model.to(device).eval()
    total, n = 0.0, 0
    for start in range(0, len(ds), bs):
        img_B3HW = torch.stack([ds[i]["img_3HW"] for i in range(start, min(start + bs, len(ds)))]).to(device)
        rec_B3HW = model.fhat_to_img(model.quantize.residual_quantize(model.img_to_f(img_B3HW)).fhat_per_scale[-1])
        total += F.mse_loss(rec_B3HW, img_B3HW, reduction="sum").item()
        n += img_B3HW.numel()
    return total / n


def train_tokenizer_for(mcfg: ModelConfig, table_path: str | Path, out: str | Path, steps: int, seed: int = 0,
                        workers: int = 0) -> dict:
    """Train, from scratch on a pairs table, the tokenizer a config's geometry asks for (no pretrained VQ
    weights exist offline); one residual block per level keeps it to CPU minutes. Resumes from `out`."""
    torch.manual_seed(seed)
    vq = VQVAE(vocab_size=mcfg.vocab_size, z_channels=mcfg.Cvae, ch=mcfg.vae_ch, ch_mult=mcfg.vae_ch_mult,
               patch_nums=mcfg.patch_nums, num_res_blocks=1)
    return train_vqvae_on_pairs(vq, table_path, steps, bs=16, lr=2e-3, out_path=out, workers=workers, seed=seed)


def images_fingerprint(table_path: str | Path, size: int) -> str:
    """sha256 of a pairs table's images as a tokenizer reads them (decoded, at ``size``, in table order)."""
    ds, digest = pairs_images(table_path, size), hashlib.sha256()
    for i in range(len(ds)):
        digest.update(ds[i]["img_3HW"].numpy().tobytes())
    return digest.hexdigest()


def bundle_tokenizer(trained: str | Path, table_path: str | Path, out: str | Path, made_by: str) -> Path:
    """A finished tokenizer checkpoint with what it was trained on (``images_fingerprint``) and how
    (``made_by``), for ``use_bundled_tokenizer``; its weights are the trained file's, bit for bit."""
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    size = VQVAE(**ckpt["config"]).image_size
    ckpt["stats"] = {k: v for k, v in ckpt["stats"].items() if k != "history"}
    ckpt["trained_on"] = {"fingerprint": images_fingerprint(table_path, size), "made_by": made_by}
    return atomic_torch_save(ckpt, out)


def use_bundled_tokenizer(bundle: str | Path, table_path: str | Path, out: str | Path, steps: int) -> bool:
    """Copy ``bundle`` (``bundle_tokenizer``) to ``out`` when no tokenizer is there yet and the bundle was
    trained for ``steps`` on exactly this table's images; whether ``out`` now holds it. Otherwise the
    caller trains its own."""
    out = Path(out)
    if out.exists():
        return False
    ckpt = torch.load(bundle, map_location="cpu", weights_only=True)
    size = VQVAE(**ckpt["config"]).image_size
    if ckpt["stats"].get("steps") != steps or ckpt["trained_on"]["fingerprint"] != images_fingerprint(table_path, size):
        return False
    shutil.copyfile(bundle, out)
    return True
