"""Offline metrics for a T2I model trained on a selected subset.

- ``fid``: Fréchet distance between generated and real images in any feature space, e.g. a local
  Inception's (``InceptionFeatures``);
- ``clip_score``: caption-image agreement from a local CLIP (``alchemist.heuristics.ClipScorer``);
- ``heldout_token_loss``: the proxy's mean token cross-entropy on clean held-out pairs, the
  paper's own meta-objective.
Nothing here downloads: every model comes from a local path. The demo's GenEval-lite and FID-lite,
judged by its attribute classifier, live with that classifier in ``experiments.attributes``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from alchemist.heuristics import ClipScorer
from alchemist.utils.dist import is_dist
from alchemist.utils.errors import UserError


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(b) for b in x.split(batch_size)])


# ----------------------------------------------------------------------------- Fréchet distance
def _sqrtm_is_real(m: np.ndarray, atol: float = 1e-3) -> bool:
    return np.isfinite(m).all() and (not np.iscomplexobj(m) or np.allclose(np.diagonal(m).imag, 0, atol=atol))


def frechet_distance_gaussians(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                               eps: float = 1e-6) -> float:
    """|µ1−µ2|² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), as pytorch-fid computes it.

    A singular product (fewer samples than dimensions, dead features) can give an inaccurate,
    non-finite or clearly complex square root; then ``eps`` is added to both diagonals and it is
    tried once more.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Fréchet distance needs matching shapes, got means {mu1.shape}, {mu2.shape} and "
                         f"covariances {sigma1.shape}, {sigma2.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", linalg.LinAlgWarning)  # "matrix is singular": take the eps route
        try:
            covmean = linalg.sqrtm(sigma1 @ sigma2)
        except linalg.LinAlgWarning:
            covmean = np.full_like(sigma1, np.nan)
    if not _sqrtm_is_real(covmean):
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not _sqrtm_is_real(covmean):
        raise ValueError("(Σ1Σ2)^½ has a large imaginary part even with an eps offset; use more samples "
                         "than feature dimensions")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def gaussian_stats(feats_NF) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of N feature rows, in float64."""
    x = np.asarray(feats_NF.detach().cpu() if isinstance(feats_NF, torch.Tensor) else feats_NF, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise UserError(f"Fréchet distance needs at least 2 feature rows (N, F), got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F)."""
    return frechet_distance_gaussians(*gaussian_stats(feats_a), *gaussian_stats(feats_b), eps=eps)


def fid(feature_fn: Callable[[torch.Tensor], torch.Tensor], gen_B3HW: torch.Tensor, real_B3HW: torch.Tensor,
        batch_size: int = 256) -> float:
    """Fréchet distance of generated to real images in the space of ``feature_fn`` (B3HW in [-1, 1] → (B, F))."""
    return frechet_distance(batched(feature_fn, gen_B3HW, batch_size), batched(feature_fn, real_B3HW, batch_size))


# ----------------------------------------------------------------------------- local-weight models
class InceptionFeatures:
    """Inception-style features of images in [-1, 1], from a local file (never downloaded).

    Accepted: a TorchScript file whose module maps float B3HW on a 0-255 scale to (B, D) (or
    (B, D, 1, 1)) features, e.g. NVlabs' ``inception-2015-12-05.pt`` used by clean-fid and the
    StyleGAN metrics (its ``return_features=True`` argument is passed when ``forward`` has one);
    or a plain state dict together with ``model``, the ``nn.Module`` it belongs to, which must
    follow the same 0-255 → features convention. Images are resized to ``image_size`` first
    (bilinear; ``None`` keeps their size).
    """

    def __init__(self, path: str | os.PathLike, model: torch.nn.Module | None = None, image_size: int | None = 299,
                 device: str | torch.device = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {str(path)!r} do not exist; pass a local TorchScript "
                                    "file such as inception-2015-12-05.pt; nothing is downloaded")
        self.device, self.image_size = torch.device(device), image_size
        try:
            self.model = torch.jit.load(str(path), map_location=self.device)
        except RuntimeError:  # not a TorchScript archive: a state dict for ``model``
            self.model = _load_into(model, path).to(self.device)
        self.model.eval()
        forward = getattr(self.model, "forward", None)
        schema = getattr(forward, "schema", None)
        names = [a.name for a in schema.arguments] if schema is not None else []
        self.kwargs = {"return_features": True} if "return_features" in names else {}

    @torch.no_grad()
    def __call__(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        x = (img_B3HW.float().to(self.device) + 1.0) * 127.5
        if self.image_size and x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.model(x, **self.kwargs).reshape(len(x), -1).float().cpu()


def _load_into(model: torch.nn.Module | None, path: Path) -> torch.nn.Module:
    if model is None:
        raise UserError(f"{str(path)!r} is not a TorchScript file; a state dict needs the module it belongs to "
                         "(InceptionFeatures(path, model=...))")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or broken file can fail in zip, pickle or tensor code
        raise UserError(f"could not read {str(path)!r} as TorchScript or as a state dict "
                         f"({type(e).__name__}); pass an Inception feature extractor file") from None
    model.load_state_dict(state)
    return model


def clip_score(clip: str | os.PathLike | ClipScorer, images_B3HW: torch.Tensor, captions: Sequence[str],
               batch_size: int = 64) -> float:
    """Mean CLIP-score 100·cos(image, caption) from a local CLIP directory (or a loaded ``ClipScorer``)."""
    if len(captions) != len(images_B3HW):
        raise ValueError(f"{len(images_B3HW)} images but {len(captions)} captions")
    scorer = clip if isinstance(clip, ClipScorer) else ClipScorer(clip)
    scores = [scorer(images_B3HW[i:i + batch_size], list(captions[i:i + batch_size]))
              for i in range(0, len(captions), batch_size)]
    return float(torch.cat(scores).mean())


# ----------------------------------------------------------------------------- proxy model
@torch.no_grad()
def heldout_token_loss(proxy, featurize: Callable[[dict], object], loader: Iterable[dict]) -> float:
    """Mean per-token cross-entropy over every token of a clean validation set, in eval mode.

    ``featurize`` turns a collated raw batch into a ``TokenBatch`` (``alchemist.data.tokens.Featurizer``);
    batches it returns ``None`` for (all images unreadable) are skipped.
    """
    was_training = proxy.training
    proxy.eval()
    total, n = 0.0, 0
    try:
        for raw in loader:
            batch = featurize(raw)
            if batch is None:
                continue
            loss_BL = proxy.per_token_loss(batch)
            total += float(loss_BL.double().sum())
            n += loss_BL.numel()
    finally:
        proxy.train(was_training)
    if is_dist():  # each rank saw its shard of the set: add the sums up
        t = torch.tensor([total, n], dtype=torch.float64, device=next(proxy.parameters()).device)
        torch.distributed.all_reduce(t)
        total, n = float(t[0]), int(t[1])
    if n == 0:
        raise UserError("held-out loader yielded no usable batch")
    return total / n


@torch.no_grad()
def generate_for_prompts(proxy, vqvae, text_encoder, captions: Sequence[str], cfg: float = 4.0, top_k: int = 600,
                         top_p: float = 0.8, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] on the CPU, one per caption, guided against the empty caption.

    Batch i is sampled with seed ``seed + i``: the output is a function of (captions, seed,
    batch_size) and the weights.
    """
    device = next(proxy.parameters()).device
    uncond = text_encoder([""]).to(device)
    out = []
    for i, start in enumerate(range(0, len(captions), batch_size)):
        text = text_encoder(list(captions[start:start + batch_size])).to(device)
        out.append(proxy.generate(vqvae, text, uncond, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed + i).cpu())
    if not out:
        raise UserError("generate_for_prompts needs at least one caption")
    return torch.cat(out)
