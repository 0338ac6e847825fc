"""Figures for a ratings table: what a strategy keeps, and what each rank band looks like.

``plot_selection`` draws the score histogram (all rows vs the kept ones) and, over the rank
axis, the share of each rank bin a strategy keeps, next to its expected inclusion
probability and, for the Gaussian samplers, the sampling weight. ``plot_rank_bands`` is the
paper's ranked-data figure: k images with captions from each rank band, best band on top.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from alchemist.selection import (discarded_head, discarded_tail, inclusion_probability, resolve_params,  # noqa: E402
                                 sampling_weight, select)
from alchemist.utils.errors import UserError  # noqa: E402

_CURVE_N = 200_000  # rows on which the (large-N) expected inclusion curve is evaluated


def plot_selection(ratings: pd.DataFrame, strategy: str, retention: float | int, out: str | os.PathLike,
                   seed: int = 0, bins: int = 100, reference: np.ndarray | None = None, **params) -> Path:
    """Score histogram and selection-by-rank panel of one strategy (``reference``: as in ``select``);
    returns the PNG path."""
    n = len(ratings)
    params = resolve_params(strategy, n, retention, ratings["score"].to_numpy(dtype=np.float64), reference, **params)
    rows = select(ratings, strategy, retention, seed, **params)
    k = len(rows)
    ranks = ratings["rank"].to_numpy()[rows]
    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")

    score = ratings["score"].to_numpy(dtype=np.float64)
    edges = np.histogram_bin_edges(score, bins=60)
    ax_s.hist(score, edges, color="0.75", label=f"all {n:,}")
    ax_s.hist(score[rows], edges, color="tab:blue", alpha=0.8, label=f"kept {k:,}")
    ax_s.set(xlabel="score (higher = rated better)", ylabel="rows", title="score histogram")
    ax_s.legend(frameon=False)

    bins = min(bins, n)  # every bin holds at least one rank
    kept = np.bincount(ranks * bins // n, minlength=bins)
    size = np.bincount(np.arange(n) * bins // n, minlength=bins)
    centres = (np.arange(bins) + 0.5) / bins
    ax_r.bar(centres, kept / size, width=1 / bins, color="tab:blue", alpha=0.6, label=f"kept share (seed {seed})")
    m = min(n, _CURVE_N)
    frac = k / n
    expected = inclusion_probability(m, strategy, max(1, round(frac * m)), **params)
    ax_r.plot(np.arange(m) / m, expected, color="k", lw=1.2, label="expected (large N)")
    pos = np.linspace(0, 1, 501)
    weight = sampling_weight(strategy, pos, **params)
    if weight is not None:
        ax_r.plot(pos, weight[0], "--", color="tab:orange", label=weight[1])
    shift = discarded_head(strategy, frac, **params)
    if shift:  # None (no head cut) or 0 (it yielded to the tail)
        ax_r.axvspan(0, shift, color="tab:red", alpha=0.08, label=f"discarded head (pos < {shift:.3g})")
    tail = discarded_tail(strategy, **params)
    if tail:
        ax_r.axvspan(1 - tail, 1, color="tab:purple", alpha=0.08, label=f"discarded tail (pos >= {1 - tail:.3g})")
    ax_r.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="rank position (0 = best)", ylabel="share of rows kept",
             title=f"{strategy}, {k:,} of {n:,} kept ({frac:.0%})")
    ax_r.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    return _save(fig, out)


def plot_rank_bands(ratings: pd.DataFrame, out: str | os.PathLike, k: int = 6, bands: int = 10, seed: int = 0,
                    image_col: str | None = None, caption_col: str = "caption", base_dir: str | os.PathLike = ".",
                    caption_chars: int = 60) -> Path:
    """A grid with ``k`` random images (and captions) from each of ``bands`` rank bands."""
    image_col = image_col or next((c for c in ("image_path", "image_save_path") if c in ratings.columns), None)
    if image_col is None or image_col not in ratings.columns:
        raise UserError(f"ratings have no image column {image_col or 'image_path / image_save_path'}; "
                         "pass image_col")
    if not np.array_equal(ratings["rank"].to_numpy(), np.arange(len(ratings))):
        ratings = ratings.sort_values("rank", ignore_index=True)
    n = len(ratings)
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(bands, k, figsize=(1.7 * k + 0.9, 2.05 * bands), squeeze=False, layout="constrained")
    for b in range(bands):
        lo, hi = -(-b * n // bands), -(-(b + 1) * n // bands)  # ranks i with i * bands // n == b
        picks = np.sort(rng.choice(np.arange(lo, hi), size=min(k, hi - lo), replace=False)) if hi > lo else []
        for j, ax in enumerate(axes[b]):
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j >= len(picks):
                continue
            row = ratings.iloc[picks[j]]
            ax.imshow(_thumbnail(Path(base_dir) / str(row[image_col])))
            caption = str(row[caption_col]) if caption_col in ratings.columns else ""
            short = textwrap.shorten(caption, caption_chars, placeholder="…")
            ax.set_xlabel("\n".join(textwrap.wrap(short, 24)[:3]), fontsize=6.5)
        axes[b][0].set_ylabel(f"{100 * b // bands}-{100 * (b + 1) // bands}%", fontsize=10, rotation=0,
                              ha="right", va="center")
    fig.suptitle(f"{n:,} pairs by rank band (top = best rated; {k} random per band, seed {seed})", fontsize=11)
    return _save(fig, out)


def _thumbnail(path: Path, size: int = 128) -> np.ndarray:
    """The image centre-cropped to a square, or a grey tile when it cannot be read."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS,
                                        box=(left, top, left + side, top + side)))
    except (OSError, ValueError):
        return np.full((size, size, 3), 200, dtype=np.uint8)


def _save(fig, out: str | os.PathLike) -> Path:
    from alchemist.utils.io import atomic_open

    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return Path(out)


def plot_samples(real_B3HW, gen_BK3HW, captions: list[str], out: str | os.PathLike, title: str = "") -> Path:
    """One row per caption: the real image, then K generated samples (tensors in [-1, 1])."""
    B, K = gen_BK3HW.shape[:2]
    fig, axes = plt.subplots(B, K + 1, figsize=(1.5 * (K + 1) + 2.5, 1.5 * B), squeeze=False, layout="constrained")
    to_np = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()  # noqa: E731
    for b in range(B):
        tiles = [real_B3HW[b]] + [gen_BK3HW[b, k] for k in range(K)]
        for j, t in enumerate(tiles):
            ax = axes[b][j]
            ax.imshow(to_np(t), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if b == 0:
                ax.set_title("real" if j == 0 else f"sample {j}", fontsize=8)
        axes[b][0].set_ylabel("\n".join(textwrap.wrap(captions[b], 28)), fontsize=7, rotation=0, ha="right",
                              va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)
