"""A synthetic data set on disk at a preset's scale, for end-to-end runs of the real entry points
(``train_rater.sh``, ``infer_rater.sh``) where no data or weights exist: JPEG images with captions of
random words in pairs tables, a random-weight tokenizer checkpoint and a random text encoder folder.
Nothing is downloaded. Used by scripts/device_check.sh."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from alchemist.bench.synthetic import Preset, bench_config, caption_words, random_tokenizer, write_random_text_encoder


def smooth_image(rng: np.random.Generator, size: int) -> Image.Image:
    """Low-frequency colour noise (what a JPEG keeps small and a tokenizer sees as structure)."""
    low = rng.random((4, 4, 3)).astype(np.float32)
    img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def write_fixture(preset: Preset, out: str | Path, n_train: int, n_val: int, n_score: int,
                  seed: int = 0) -> list[str]:
    """Write ``train.csv``, ``val.csv``, ``score.csv`` (ids, image paths relative to ``out``, captions),
    their images, ``tokenizer.pt`` and ``text_encoder/``; the ``--key=value`` overrides that point a
    RaterConfig at them (the preset's geometry included)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cfg = bench_config(preset, out)
    size = cfg.data.image_size
    rng, words = np.random.default_rng(seed), caption_words(preset.text)
    pick = random.Random(seed)
    n_img = max(n_train + n_val, n_score)
    for i in range(n_img):
        path = out / "images" / f"{i:06d}.jpg"
        if not path.exists():
            smooth_image(rng, size).save(path, quality=90)
    captions = [" ".join(pick.choices(words, k=pick.randint(*preset.caption_words))) for _ in range(n_img)]
    rows = pd.DataFrame({"id": [f"p{i:06d}" for i in range(n_img)],
                         "image_path": [f"images/{i:06d}.jpg" for i in range(n_img)], "caption": captions})
    rows.iloc[:n_train].to_csv(out / "train.csv", index=False)
    rows.iloc[n_train:n_train + n_val].to_csv(out / "val.csv", index=False)
    rows.iloc[:n_score].to_csv(out / "score.csv", index=False)

    m = cfg.model
    torch.manual_seed(seed)
    vq = random_tokenizer(m, "cpu")
    kw = {"vocab_size": m.vocab_size, "z_channels": m.Cvae, "ch": m.vae_ch, "ch_mult": list(m.vae_ch_mult),
          "patch_nums": list(m.patch_nums)}
    torch.save({"state_dict": vq.state_dict(), "config": kw}, out / "tokenizer.pt")
    write_random_text_encoder(out / "text_encoder", preset.text, m.text_max_len, seed)

    over = {**preset.overrides, "train_csv_path": out / "train.csv", "val_csv_path": out / "val.csv",
            "ckpt_path": out, "vae_ckpt": "tokenizer.pt", "text_enc_path": out / "text_encoder"}
    fmt = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    return [f"--{k}={fmt(v)}" for k, v in over.items()]
