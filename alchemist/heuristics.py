"""Heuristic per-image scores: the paper's Table 1 baselines (docs/method.md §7).

Image statistics (no model, batched in torch): ``clarity`` (variance of the Laplacian),
``lowfreq`` (share of spectral energy in a low-frequency disc) and ``edge_density``
(share of pixels whose Sobel gradient exceeds an Otsu threshold). Model scores, loaded
only from local paths: :class:`ClipScorer` (CLIP-score) and :class:`AestheticScorer`
(the LAION aesthetic predictor).

Images are PIL images or float tensors in [-1, 1] (3HW or B3HW), as ``alchemist.data``
produces them; statistics are computed on the BT.601 grey image on a 0-255 scale, so
``clarity`` matches the usual ``cv2.Laplacian(grey, cv2.CV_64F).var()``. They depend on
resolution: compare images preprocessed to the same size.

The paper does not say which end of each statistic it keeps. ``HIGHER_IS_BETTER`` records
our reading (detail and sharpness are good, a spectrum concentrated at low frequencies is
plain): a ratings ``score`` is the statistic, negated where lower is better.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from alchemist.utils.errors import UserError

HIGHER_IS_BETTER = {"clarity": True, "lowfreq": False, "edge_density": True, "clip": True, "aesthetic": True}
LOWFREQ_RADIUS = 0.1  # disc radius as a fraction of the Nyquist frequency (0.05 cycles / pixel)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's "L" mode and OpenCV
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing defaults
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- inputs
def as_batch(images: Image.Image | Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    """B3HW float in [-1, 1] from a PIL image, a list of same-sized PIL images, or a tensor."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        img = images.float()
    else:
        arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
        img = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if img.ndim == 3:
        img = img[None]
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"expected images as 3HW or B3HW tensors, got shape {tuple(img.shape)}")
    return img


def grey(images) -> torch.Tensor:
    """BHW grey levels on a 0-255 scale."""
    img_B3HW = (as_batch(images) + 1.0) * 127.5
    return torch.einsum("bchw,c->bhw", img_B3HW, torch.tensor(_LUMA))


def _filter(grey_BHW: torch.Tensor, kernel_kk: torch.Tensor) -> torch.Tensor:
    """Correlate each image with a small kernel, reflecting the border (OpenCV's default)."""
    k = kernel_kk.shape[-1]
    x = F.pad(grey_BHW[:, None], (k // 2,) * 4, mode="reflect")
    return F.conv2d(x, kernel_kk[None, None].to(x))[:, 0]


# ----------------------------------------------------------------------------- statistics
def clarity(images) -> torch.Tensor:
    """Variance of the 4-neighbour Laplacian, shape (B,); higher = sharper."""
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    return _filter(grey(images).double(), lap).flatten(1).var(dim=1, unbiased=False)


def low_frequency_energy(images, radius: float = LOWFREQ_RADIUS) -> torch.Tensor:
    """Share of spectral energy within ``radius`` × Nyquist of DC, shape (B,), in [0, 1].

    The mean is removed (DC carries brightness, not structure) and a Hann window keeps the
    image border from counting as an edge. A flat image has no energy at all and scores 1.
    """
    g = grey(images).double()
    b, h, w = g.shape
    g = (g - g.mean(dim=(1, 2), keepdim=True)) * torch.outer(torch.hann_window(h, periodic=False, dtype=g.dtype),
                                                             torch.hann_window(w, periodic=False, dtype=g.dtype))
    power = torch.fft.fft2(g).abs().square()
    fy, fx = torch.fft.fftfreq(h, dtype=g.dtype), torch.fft.fftfreq(w, dtype=g.dtype)
    low = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() <= radius * 0.5
    total = power.flatten(1).sum(1)
    share = (power * low).flatten(1).sum(1) / total.clamp_min(1e-300)
    return torch.where(total > 1e-12 * h * w, share, torch.ones_like(share))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: maximises the between-class variance of ``values <= t`` vs ``> t``.

    Returned as the upper edge of the last bin of the low class; constant input returns
    its value, so nothing lies above it.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = hist / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)[:-1]  # weight of the low class when it ends at bin i; in (0, 1) since
    m0 = np.cumsum(p * centres)[:-1]  # the first and the last bin hold the min and the max
    mean = m0[-1] + p[-1] * centres[-1]
    between = (mean * w0 - m0) ** 2 / (w0 * (1.0 - w0))
    return float(edges[int(np.argmax(between)) + 1])


def edge_density(images) -> torch.Tensor:
    """Share of pixels whose Sobel gradient magnitude exceeds that image's Otsu threshold, (B,)."""
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    g = grey(images).double()
    mag_BHW = torch.hypot(_filter(g, sobel_x), _filter(g, sobel_x.T))
    thr = torch.tensor([otsu_threshold(m.numpy()) for m in mag_BHW], dtype=mag_BHW.dtype)
    return (mag_BHW > thr[:, None, None]).flatten(1).double().mean(1)


STATISTICS = {"clarity": clarity, "lowfreq": low_frequency_energy, "edge_density": edge_density}


# ----------------------------------------------------------------------------- model scores
def _local_dir(path: str | os.PathLike, what: str, hint: str) -> Path:
    p = Path(path) if path else None
    if p is None or not p.is_dir():
        raise FileNotFoundError(f"{what} directory {str(path)!r} does not exist; {hint}")
    return p


class ClipScorer:
    """CLIP-score 100 · cos(image, caption) from a local transformers CLIP directory.

    Unclipped (torchmetrics clamps at 0, which only creates ties when ranking). Images are
    resized and normalised in torch as CLIP's processor would, from its
    ``preprocessor_config.json`` when present, else OpenAI's defaults.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import CLIPModel

        self.path = _local_dir(path, "CLIP model", "save one locally (e.g. CLIPModel.save_pretrained) and pass "
                               "that directory; nothing is downloaded")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(self.path, local_files_only=True).eval().to(self.device)
        cfg_file = self.path / "preprocessor_config.json"
        pre = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        crop = pre.get("crop_size", self.model.config.vision_config.image_size)
        self.size = crop["height"] if isinstance(crop, dict) else int(crop)
        self.mean = torch.tensor(pre.get("image_mean", _CLIP_MEAN), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", _CLIP_STD), device=self.device).view(1, 3, 1, 1)
        self._tokenizer = None  # loaded on first use: the aesthetic predictor needs no text

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        """(B, D) unit-norm CLIP image embeddings."""
        x = (as_batch(images).to(self.device) + 1.0) / 2.0
        side = min(x.shape[-2:])
        top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
        x = x[..., top:top + side, left:left + side]
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        out = self.model.get_image_features(pixel_values=((x.clamp(0, 1) - self.mean) / self.std))
        return F.normalize(_features(out).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, D) unit-norm CLIP text embeddings; captions truncated to the model's context."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        tok = self._tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt",
                              max_length=self.model.config.text_config.max_position_embeddings)
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(_features(out).float(), dim=-1)

    def __call__(self, images, captions: Sequence[str]) -> torch.Tensor:
        return 100.0 * (self.image_embeds(images) * self.text_embeds(captions)).sum(-1).cpu()


def _features(out) -> torch.Tensor:
    """transformers < 5 returns the projected features; 5.x wraps them as ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# The public LAION predictor (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE.pth")
# is a plain state dict of this Sequential: Linear(768,1024) Dropout(.2) Linear(1024,128) Dropout(.2)
# Linear(128,64) Dropout(.1) Linear(64,16) Linear(16,1), fed unit-norm CLIP ViT-L/14 image embeddings.
AESTHETIC_LINEARS = (0, 2, 4, 6, 7)
_AESTHETIC_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}


def aesthetic_mlp(state_dict: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """The LAION aesthetic MLP with the widths read off ``state_dict`` (keys ``layers.{0,2,4,6,7}.*``)."""
    want = {f"layers.{i}.{p}" for i in AESTHETIC_LINEARS for p in ("weight", "bias")}
    if set(state_dict) != want:
        raise UserError(f"aesthetic MLP weights do not match the LAION layout (missing "
                         f"{sorted(want - set(state_dict))}, unexpected {sorted(set(state_dict) - want)}); "
                         "expected keys layers.{0,2,4,6,7}.{weight,bias}")
    layers = []
    for i in range(AESTHETIC_LINEARS[-1] + 1):
        if i in AESTHETIC_LINEARS:
            out_f, in_f = state_dict[f"layers.{i}.weight"].shape
            layers.append(torch.nn.Linear(in_f, out_f))
        else:
            layers.append(torch.nn.Dropout(_AESTHETIC_DROPOUT[i]))
    mlp = torch.nn.Sequential()
    mlp.add_module("layers", torch.nn.Sequential(*layers))
    mlp.load_state_dict(state_dict)
    return mlp.eval()


class AestheticScorer:
    """LAION aesthetic score (about 1-10): an MLP over unit-norm CLIP image embeddings."""

    def __init__(self, clip_path: str | os.PathLike, mlp_path: str | os.PathLike,
                 device: str | torch.device = "cpu"):
        mlp_path = Path(mlp_path) if mlp_path else None
        if mlp_path is None or not mlp_path.is_file():
            raise FileNotFoundError(f"aesthetic MLP weights {str(mlp_path)!r} do not exist; pass the local "
                                    "sac+logos+ava1-l14-linearMSE.pth file; nothing is downloaded")
        state = torch.load(mlp_path, map_location="cpu", weights_only=True)
        mlp = aesthetic_mlp(state.get("state_dict", state))  # checked before the (slower) CLIP load
        self.clip = ClipScorer(clip_path, device)
        self.mlp = mlp.to(self.clip.device)
        in_f = self.mlp.layers[0].in_features
        if in_f != self.clip.embed_dim:
            raise UserError(f"aesthetic MLP takes {in_f}-d embeddings but the CLIP model at {clip_path} gives "
                             f"{self.clip.embed_dim}-d; use the CLIP the MLP was trained on (ViT-L/14: 768)")

    @torch.no_grad()
    def __call__(self, images, captions: Sequence[str] | None = None) -> torch.Tensor:
        return self.mlp(self.clip.image_embeds(images))[:, 0].cpu()


# ----------------------------------------------------------------------------- rating a table
HEURISTICS = tuple(HIGHER_IS_BETTER)


def make_scorer(heuristic: str, clip_path: str = "", mlp_path: str = "", device: str = "cpu"):
    """A callable ``(img_B3HW, captions) -> scores_B`` for one heuristic name."""
    if heuristic in STATISTICS:
        stat = STATISTICS[heuristic]
        return lambda img_B3HW, captions: stat(img_B3HW)
    if heuristic == "clip":
        return ClipScorer(clip_path, device)
    if heuristic == "aesthetic":
        return AestheticScorer(clip_path, mlp_path, device)
    raise UserError(f"unknown heuristic {heuristic!r}; choose one of {', '.join(HEURISTICS)}")


def rate_pairs(table, heuristic: str, scorer, image_size: int = 256, bs: int = 64, workers: int = 0,
               flip: bool = False, progress: bool = True):
    """Score every pair of a ``load_pairs`` table; return (ratings table, skipped (id, reason) list).

    The ratings keep the table's columns, add the raw statistic under the heuristic's name and
    ``score`` (the statistic, negated where lower is better, reversed again by ``flip``), and are
    ranked by :func:`alchemist.ratings.rank_scores`. Unreadable images are skipped, not fatal.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from alchemist.data.pairs import PairsDataset, collate_pairs
    from alchemist.ratings import rank_scores

    loader = DataLoader(PairsDataset(table, image_size), batch_size=bs, num_workers=workers,
                        collate_fn=collate_pairs)
    values = np.full(len(table), np.nan)
    skipped: list[tuple[str, str]] = []
    for batch in tqdm(loader, desc=f"scoring {heuristic}", unit="batch", disable=not progress):
        skipped.extend(batch["skipped"])
        if len(batch["ids"]):
            values[batch["index_B"].numpy()] = scorer(batch["img_B3HW"], batch["captions"]).double().numpy()
    ok = ~np.isnan(values)
    sign = 1.0 if HIGHER_IS_BETTER[heuristic] != flip else -1.0
    rated = table.loc[ok].assign(**{heuristic: values[ok], "score": sign * values[ok]})
    return rank_scores(rated), skipped
