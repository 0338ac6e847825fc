"""The second benchmark: real scans, not generated shapes, with the demo's planted defects.

The images are the UCI handwritten digits (1,797 scans of digits written by 43 people, 8×8 grey
levels) that scikit-learn ships inside its wheel, so they install offline. Each scan is inverted to dark
ink on white and resized (bicubic) to the demo's 32×32. Captions name the digit ("a handwritten
digit seven", three templates), so a caption that names another digit is detectable in principle.

Planted kinds, as in the demo (rates of the training rows): ``plain`` (a uniform light-grey page,
generic caption), ``noise`` (random grey pixels, a digit caption), ``misaligned`` (a scan captioned with
another digit), ``duplicate`` (an exact copy of a clean training pair), ``blurred`` (a clean scan,
Gaussian blur of radius size/12). Validation rows are clean scans held out from training. The truth
lives in ``defects.csv`` (``label`` = the digit in the image, -1 for plain and noise), which no
training code reads. Everything is a function of ``DigitsSpec``: the same spec gives the same bytes.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from alchemist.utils.errors import UserError
from alchemist.utils.io import atomic_open
from experiments.demo_data import png_bytes
from experiments.types import KINDS

FORMAT_VERSION = 1  # bump when the generator's output changes, so old outputs are not reused
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {w}", "the number {w}, handwritten", "a scan of a handwritten {w}")
GENERIC_CAPTIONS = ("a blank scan", "an empty page", "a scan", "a blank image")


@dataclass(frozen=True)
class DigitsSpec:
    seed: int = 0
    n_val: int = 400  # held-out clean scans; the other 1,397 are the training rows
    image_size: int = 32
    rate_plain: float = 0.10
    rate_noise: float = 0.10
    rate_misaligned: float = 0.10
    rate_duplicate: float = 0.05
    rate_blurred: float = 0.10

    def __post_init__(self):
        rates = [getattr(self, f"rate_{k}") for k in KINDS[1:]]
        if not all(0.0 <= r <= 1.0 for r in rates) or sum(rates) > 0.9:
            raise UserError(f"digits rates must be in [0, 1] and sum to <= 0.9, got {rates}")
        if not 1 <= self.n_val < 1797 or self.image_size < 8:
            raise UserError("digits need 1 <= n_val < 1797 and image_size >= 8")


def _load_scans() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # an experiments-only dependency
        raise ImportError("the digits benchmark needs scikit-learn (pip install scikit-learn; it ships the "
                          "scans, nothing is downloaded)") from e
    d = load_digits()
    return d.images, d.target


def scan_image(v_88: np.ndarray, size: int) -> Image.Image:
    """A 0..16 ink map as dark ink on white, bicubic-resized to ``size``."""
    grey = np.clip(255.0 - v_88 * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").resize((size, size), Image.BICUBIC).convert("RGB")


def _spec_record(spec: DigitsSpec) -> dict:
    return {"format_version": FORMAT_VERSION, "benchmark": "digits", "spec": dataclasses.asdict(spec)}


def generate_digits(out_dir: str | Path, spec: DigitsSpec = DigitsSpec(), force: bool = False) -> dict[str, int]:
    """Write ``images/*.png``, ``train.csv``, ``val.csv``, ``defects.csv`` and ``spec.json`` to
    ``out_dir`` (reused when the same spec is there, unless ``force``); returns rows per kind and split."""
    out = Path(out_dir)
    spec_path = out / "spec.json"
    complete = all((out / n).is_file() for n in ("spec.json", "train.csv", "val.csv", "defects.csv"))
    if not (complete and not force and json.loads(spec_path.read_text()) == _spec_record(spec)):
        spec_path.unlink(missing_ok=True)
        _write(out, spec)
        with atomic_open(spec_path) as f:
            json.dump(_spec_record(spec), f, indent=2)
    defects = pd.read_csv(out / "defects.csv", dtype={"id": str}, keep_default_na=False)
    counts = {f"train {k}": int(((defects["split"] == "train") & (defects["kind"] == k)).sum()) for k in KINDS}
    return {**counts, "val": int((defects["split"] == "val").sum())}


def _write(out: Path, spec: DigitsSpec) -> None:
    images_88, labels = _load_scans()
    kinds_rng, rng = (np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(2))
    order = kinds_rng.permutation(len(labels))
    val_idx, train_idx = order[:spec.n_val], order[spec.n_val:]
    n = len(train_idx)
    counts = {k: int(round(getattr(spec, f"rate_{k}") * n)) for k in KINDS[1:]}
    kinds = np.array(["clean"] * (n - sum(counts.values())) + [k for k, c in counts.items() for _ in range(c)],
                     dtype=object)[kinds_rng.permutation(n)]
    clean = np.flatnonzero(kinds == "clean")

    def caption(y: int) -> str:
        return TEMPLATES[rng.integers(len(TEMPLATES))].format(w=WORDS[y])

    size, blur = spec.image_size, ImageFilter.GaussianBlur(radius=spec.image_size / 12)
    rows, pngs = [], []
    for i, kind in enumerate(kinds):
        src = int(train_idx[i])
        y = int(labels[src])
        img, cap, label, source = scan_image(images_88[src], size), caption(y), y, ""
        if kind == "blurred":
            img = img.filter(blur)
        elif kind == "plain":
            g = int(rng.integers(200, 256))
            img, cap, label = Image.new("RGB", (size, size), (g, g, g)), str(rng.choice(GENERIC_CAPTIONS)), -1
        elif kind == "noise":
            img, label = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").convert("RGB"), -1
        elif kind == "misaligned":
            cap = caption(int((y + rng.integers(1, 10)) % 10))
        elif kind == "duplicate":
            source = f"train_{int(rng.choice(clean)):05d}"
        rows.append({"id": f"train_{i:05d}", "split": "train", "kind": kind, "source_id": source, "caption": cap,
                     "label": label, "uci_index": src})
        pngs.append(png_bytes(img))
    index = {r["id"]: j for j, r in enumerate(rows)}
    for j, r in enumerate(rows):  # a duplicate is its clean source's pair, byte for byte
        if r["kind"] == "duplicate":
            s = index[r["source_id"]]
            r.update(caption=rows[s]["caption"], label=rows[s]["label"], uci_index=rows[s]["uci_index"])
            pngs[j] = pngs[s]
    for j, src in enumerate(val_idx):
        y = int(labels[src])
        rows.append({"id": f"val_{j:05d}", "split": "val", "kind": "clean", "source_id": "", "caption": caption(y),
                     "label": y, "uci_index": int(src)})
        pngs.append(png_bytes(scan_image(images_88[src], size)))

    (out / "images").mkdir(parents=True, exist_ok=True)
    for r, png in zip(rows, pngs):
        (out / "images" / f"{r['id']}.png").write_bytes(png)
    table = pd.DataFrame(rows).assign(image_path=lambda t: "images/" + t["id"] + ".png")
    for split in ("train", "val"):
        with atomic_open(out / f"{split}.csv") as f:
            table[table["split"] == split][["id", "image_path", "caption"]].to_csv(f, index=False)
    with atomic_open(out / "defects.csv") as f:
        table.drop(columns=["image_path"]).to_csv(f, index=False)
