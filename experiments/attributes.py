"""A small CNN that reads a demo scene's attributes back, and the two metrics it judges: GenEval-lite
and FID-lite.

GenEval checks generated images with an object detector; the demo data has six closed
vocabularies (shape, colour, count, position, background, size), so a classifier with one head
per attribute does that job here. It is trained on clean demo scenes only (the defects.csv
``clean`` train rows plus freshly rendered scenes from the same generator) and tested on the
demo's clean val split, which it never trains on. Its penultimate layer is the feature space of
FID-lite.

It lives in ``experiments`` rather than ``alchemist.evaluation`` because it can only judge demo
scenes: its vocabularies and its extra training scenes come from the demo generator
(``experiments.demo_data``). The generic metrics (Fréchet distance, FID in any feature space, CLIP
score, held-out loss) stay in ``alchemist.evaluation.metrics``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from alchemist.data.pairs import load_image, preprocess_image
from alchemist.evaluation.metrics import batched, fid
from alchemist.utils.errors import UserError
from alchemist.utils.io import atomic_torch_save
from experiments.demo_data import (BACKGROUNDS, COLOURS, COUNT_WORDS, POSITIONS, SHAPES, SIZES, render_scene,
                                   sample_scene, summarize)

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": tuple(SHAPES), "colour": tuple(COLOURS), "count": tuple(str(c) for c in COUNT_WORDS),
    "position": tuple(POSITIONS), "background": tuple(BACKGROUNDS), "size": tuple(SIZES)}
NOT_ASKED = ("", "nan", "0")  # how defects.csv fills the attributes of a caption that asks for none


def encode_attributes(table: pd.DataFrame, attributes=tuple(ATTRIBUTES)) -> torch.Tensor:
    """(B, A) class ids of the named attribute columns; -1 where a row asks for nothing.

    Values are compared as text, so a count read as int, float or str works alike.
    """
    cols = []
    for a in attributes:
        if a not in table.columns:
            raise UserError(f"attribute table has no column {a!r} (columns: {', '.join(map(str, table.columns))})")
        index = {v: i for i, v in enumerate(ATTRIBUTES[a])}
        values = table[a].astype(str).str.strip().str.replace(r"\.0$", "", regex=True)  # a count read as float
        unknown = sorted(set(values) - set(index) - set(NOT_ASKED))
        if unknown:
            raise UserError(f"attribute {a!r} has unknown value(s) {unknown[:5]}; "
                             f"expected one of {list(ATTRIBUTES[a])}")
        cols.append([index.get(v, -1) for v in values])
    return torch.tensor(cols, dtype=torch.long).T.reshape(len(table), len(attributes))


class AttributeClassifier(nn.Module):
    """Conv stack → flattened map (keeps where things are, which ``position`` needs) → features → heads."""

    def __init__(self, image_size: int = 32, widths: tuple[int, ...] = (16, 32, 64, 64), feat_dim: int = 128):
        super().__init__()
        self.config = dict(image_size=int(image_size), widths=tuple(int(w) for w in widths), feat_dim=int(feat_dim))
        layers, c_in = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = w
        self.body = nn.Sequential(*layers)
        side = image_size // 2 ** (len(widths) - 1)
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * side * side, feat_dim), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(feat_dim, len(v)) for a, v in ATTRIBUTES.items()})

    def _fit_size(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        size = self.config["image_size"]
        if img_B3HW.shape[-2:] == (size, size):
            return img_B3HW
        return F.interpolate(img_B3HW, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    def features(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """(B, feat_dim) penultimate activations of images in [-1, 1] (resized to the trained size)."""
        return self.proj(self.body(self._fit_size(img_B3HW.float())))

    def forward(self, img_B3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute, each (B, n_classes)."""
        h = self.features(img_B3HW)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """(B, A) argmax class ids in ``ATTRIBUTES`` order (call in eval mode)."""
        return torch.stack([lg.argmax(-1) for lg in self(img_B3HW).values()], dim=1)


# ----------------------------------------------------------------------------- data
def render_clean_scenes(n: int, image_size: int, seed: int) -> tuple[torch.Tensor, pd.DataFrame]:
    """``n`` fresh clean scenes from the demo generator: (images in [-1, 1], attribute table)."""
    rng = np.random.default_rng(seed)
    imgs, rows = [], []
    for _ in tqdm(range(n), desc="rendering scenes", disable=None):
        scene = sample_scene(rng)
        imgs.append(preprocess_image(render_scene(scene, image_size, rng), image_size))
        rows.append(scene.attributes())
    return torch.stack(imgs), pd.DataFrame(rows)


def load_clean_demo(demo_dir: str | os.PathLike, split: str) -> tuple[torch.Tensor, pd.DataFrame]:
    """The clean rows of one demo split: (images in [-1, 1], their defects.csv rows)."""
    demo_dir = Path(demo_dir)
    if not (demo_dir / "spec.json").is_file():
        raise FileNotFoundError(f"{str(demo_dir)!r} is not a finished demo data folder (no spec.json); "
                                "make one with scripts/demo.py data --out DIR")
    size = summarize(demo_dir).spec.image_size
    defects = pd.read_csv(demo_dir / "defects.csv", dtype=str, keep_default_na=False)
    rows = defects[(defects["split"] == split) & (defects["kind"] == "clean")].reset_index(drop=True)
    if rows.empty:
        raise UserError(f"demo folder {str(demo_dir)!r} has no clean {split} rows to train or test the classifier on")
    imgs = [load_image(str(demo_dir / "images" / f"{i}.png"), size) for i in rows["id"]]
    return torch.stack(imgs), rows


# ----------------------------------------------------------------------------- training
def degrade(img_B3HW: torch.Tensor, gen: torch.Generator, max_blur: float = 1.2,
            max_noise: float = 0.1) -> torch.Tensor:
    """Per image a random Gaussian blur (sigma up to ``max_blur`` px) and pixel noise (std up to
    ``max_noise``): generated images are softer than the renderer's, and a judge trained on crisp
    scenes alone miscounts and misreads shapes at a 1 px blur."""
    B, C, H, W = img_B3HW.shape
    sigma_B = torch.rand(B, generator=gen) * max_blur
    t = torch.arange(-3.0, 4.0)
    k_BK = torch.exp(-t**2 / (2 * sigma_B.clamp(min=1e-3)[:, None] ** 2))
    k = (k_BK / k_BK.sum(1, keepdim=True)).repeat_interleave(C, 0)[:, None, None, :]  # (B*C, 1, 1, 7)
    x = img_B3HW.reshape(1, B * C, H, W)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k, groups=B * C)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.transpose(-1, -2), groups=B * C)
    noise_B = torch.rand(B, 1, 1, 1, generator=gen) * max_noise
    return (x.view_as(img_B3HW) + noise_B * torch.randn(img_B3HW.shape, generator=gen)).clamp(-1, 1)


@torch.no_grad()
def accuracy(model: AttributeClassifier, img_B3HW: torch.Tensor, labels_BA: torch.Tensor,
             batch_size: int = 500) -> dict[str, float]:
    """Held-out accuracy per attribute (rows with label -1 are not counted)."""
    model.eval()
    pred = torch.cat([model.predict(x) for x in img_B3HW.split(batch_size)])
    asked = labels_BA >= 0
    hits = ((pred == labels_BA) & asked).sum(0) / asked.sum(0).clamp(min=1)
    return {a: float(h) for a, h in zip(ATTRIBUTES, hits)}


def fit_classifier(train_img: torch.Tensor, train_labels: torch.Tensor, epochs: int = 12, seed: int = 0,
                   batch_size: int = 128, lr: float = 3e-3) -> AttributeClassifier:
    """AdamW + one-cycle schedule on the summed cross-entropy of all heads, on ``degrade``d images;
    returns the model in eval mode."""
    torch.manual_seed(seed)
    model = AttributeClassifier(image_size=train_img.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(train_img) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="attribute classifier", disable=None):
        for idx in torch.randperm(len(train_img), generator=gen).split(batch_size):
            logits = model(degrade(train_img[idx], gen))
            y = train_labels[idx]
            loss = sum(F.cross_entropy(lg, y[:, j], ignore_index=-1) for j, lg in enumerate(logits.values()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_attribute_classifier(demo_dir: str | os.PathLike, out_path: str | os.PathLike, epochs: int = 12,
                               seed: int = 0, n_extra: int = 10000, batch_size: int = 128) -> dict:
    """Train on the demo's clean train rows plus ``n_extra`` fresh scenes, test on its clean val split.

    Saves ``{"config", "vocab", "state_dict", "stats"}`` atomically to ``out_path`` and returns the
    stats: per-attribute held-out accuracy, sizes and seconds.
    """
    t0 = time.perf_counter()
    img, rows = load_clean_demo(demo_dir, "train")
    val_img, val_rows = load_clean_demo(demo_dir, "val")
    labels = encode_attributes(rows)
    if n_extra > 0:
        extra_img, extra_rows = render_clean_scenes(n_extra, img.shape[-1], seed=seed)
        img, labels = torch.cat([img, extra_img]), torch.cat([labels, encode_attributes(extra_rows)])
    model = fit_classifier(img, labels, epochs=epochs, seed=seed, batch_size=batch_size)
    stats = {"heldout_accuracy": accuracy(model, val_img, encode_attributes(val_rows)),
             "n_train": len(img), "n_heldout": len(val_img), "epochs": epochs, "seed": seed, "batch_size": batch_size,
             "seconds": time.perf_counter() - t0}
    save_attribute_classifier(model, out_path, stats)
    return stats


def save_attribute_classifier(model: AttributeClassifier, path: str | os.PathLike, stats: dict | None = None) -> Path:
    return atomic_torch_save({"config": model.config, "vocab": {a: list(v) for a, v in ATTRIBUTES.items()},
                              "state_dict": model.state_dict(), "stats": stats or {}}, path)


def load_attribute_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> AttributeClassifier:
    """The saved classifier in eval mode; refuses one trained on other vocabularies."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute classifier {str(path)!r} does not exist; train one with "
                                "scripts/experiment.py classifier --demo DIR --out FILE")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("vocab") != {a: list(v) for a, v in ATTRIBUTES.items()}:
        raise UserError(f"attribute classifier {str(path)!r} was trained on other attribute vocabularies than "
                         "experiments.demo_data defines now; retrain it")
    model = AttributeClassifier(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------- GenEval-lite and FID-lite
def geneval_lite(classifier: AttributeClassifier, images_B3HW: torch.Tensor, requested: pd.DataFrame,
                 batch_size: int = 500) -> dict[str, float]:
    """Share of requested attributes the classifier reads back from the images.

    ``requested`` has one row per image and any of the ``ATTRIBUTES`` columns (e.g. the rows of
    defects.csv whose captions were the prompts); an empty cell means "not asked". Returns the
    share per asked attribute, ``mean`` (over all asked (image, attribute) pairs) and
    ``all_correct`` (share of images with every asked attribute right).
    """
    attrs = [a for a in ATTRIBUTES if a in requested.columns]
    if not attrs:
        raise ValueError(f"requested attributes need at least one of the columns {list(ATTRIBUTES)}")
    if len(requested) != len(images_B3HW):
        raise ValueError(f"{len(images_B3HW)} images but {len(requested)} rows of requested attributes")
    want_BA = encode_attributes(requested, attrs)
    classifier.eval()
    pred_BA = batched(classifier.predict, images_B3HW, batch_size)[:, [list(ATTRIBUTES).index(a) for a in attrs]]
    asked_BA = want_BA >= 0
    hit_BA = (pred_BA == want_BA) & asked_BA
    out = {a: float(hit_BA[:, j].sum() / asked_BA[:, j].sum()) for j, a in enumerate(attrs) if asked_BA[:, j].any()}
    any_asked = asked_BA.any(1)
    out["mean"] = float(hit_BA.sum() / asked_BA.sum().clamp(min=1))
    out["all_correct"] = float((hit_BA | ~asked_BA).all(1)[any_asked].float().mean()) if any_asked.any() else 0.0
    return out


def fid_lite(classifier: AttributeClassifier, gen_B3HW: torch.Tensor, real_B3HW: torch.Tensor,
             batch_size: int = 500) -> float:
    """FID in the attribute classifier's penultimate features: cheap, and tuned to what the demo varies."""
    classifier.eval()
    return fid(classifier.features, gen_B3HW, real_B3HW, batch_size)
