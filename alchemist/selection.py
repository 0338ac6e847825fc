"""Pruning strategies: which rows of a ranked dataset to keep (docs/method.md §6). The one file to
edit to change the pruning rule: figures and experiments read the rule from here.

Everything here works in *rank space*: position 0 is the best-rated pair and
``pos = rank / N`` lies in [0, 1). :func:`select` is pure and deterministic for
a given seed; it touches no files, so 30 M rows prune in seconds (see
docs/selection.md for measured timings).

Strategies (parameters are fractions of N, like ``pos``):
  ``topk`` / ``bottomk``  the K best / worst rows;
  ``random``              K rows uniformly, without replacement;
  ``block``               the window [start, start + K/N)  (``start``);
  ``gsample``             K rows without replacement, p ∝ exp(−(pos−µ)²/2σ²)  (``mu``, ``sigma``);
  ``shift_gsample``       drop pos < shift and pos >= 1 − tail, then ``gsample`` the support between
                          (``mu``, ``sigma``, ``shift``, ``tail``).

µ and σ are unpublished; the paper's figure peaks near pos 0.5-0.55 with support 0.25-0.85.
Shift-Gsample's defaults follow one rule, written down before the outcomes it was judged on were seen
(``resolve_params``; docs/selection.md): the tail is the most junk the rated rows can hold given a
*reference*, the rater's scores of trusted pairs (its validation set): Storey's estimate with λ at
the reference's median (``junk_share``) scaled up for the junk that scores above that median
(``junk_ceiling``), at least the paper's 0.15, which is also the tail without a reference; the shift
is the paper's, shrunk when the support left would hold fewer than K rows; the Gaussian is centred on
the support with ±2σ spanning it (support 0.25-0.85 gives µ 0.55, σ 0.15).
Plain ``gsample`` keeps fixed defaults µ 0.55, σ 0.15 and no cut.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from alchemist.utils.errors import UserError

STRATEGIES = ("shift_gsample", "gsample", "block", "topk", "bottomk", "random")
PARAMS = {
    "shift_gsample": ("mu", "sigma", "shift", "tail"),
    "gsample": ("mu", "sigma"),
    "block": ("start",),
    "topk": (),
    "bottomk": (),
    "random": (),
}
SEEDED = ("random", "gsample", "shift_gsample")  # strategies whose selection depends on the seed
DEFAULT_MU = 0.55
DEFAULT_SIGMA = 0.15
DEFAULT_BLOCK_START = 0.4  # the paper's best windows start around s0.4-s0.6
# Default shift by retention fraction: the paper's three settings (0.25 up to 50 %, 0.15 at
# 80 %, 0.05 at 90 %), linear in between and down to 0 at 100 % so every K stays feasible.
SHIFT_KNOTS = ((0.0, 0.5, 0.8, 0.9, 1.0), (0.25, 0.25, 0.15, 0.05, 0.0))
DEFAULT_TAIL = 0.15  # the paper's figure: no selection below pos 0.85
MIN_REFERENCE = 50  # fewer trusted scores than this give too loose a median to estimate junk from
JUNK_ABOVE_MEDIAN = 0.25  # the share of junk assumed at most to score above the trusted median


def default_shift(fraction: float) -> float:
    """The head fraction Shift-Gsample discards when keeping ``fraction`` of the data."""
    return float(np.interp(fraction, *SHIFT_KNOTS))


def junk_share(scores: np.ndarray, reference: np.ndarray) -> float:
    """The estimated share of junk among rated rows, given the same rater's scores of trusted pairs.

    Storey's estimator with λ at the reference's median m: a good row scores above m with probability
    ½, junk (which scores lower) less often, so the good share is about 2·P(score > m) (ties count
    half), capped at 1. Continuous in the scores, unlike a test for modes, so a ranking that moves a
    little moves the cut a little."""
    s = np.asarray(scores, dtype=np.float64)
    m = float(np.median(check_reference(reference)))
    above = (np.count_nonzero(s > m) + 0.5 * np.count_nonzero(s == m)) / len(s)
    return float(max(0.0, 1.0 - 2.0 * above))


def junk_ceiling(scores: np.ndarray, reference: np.ndarray) -> float:
    """The largest junk share consistent with ``junk_share`` if at most ``JUNK_ABOVE_MEDIAN`` (q) of the
    junk scores above the trusted median: junk_share / (1 − 2q), capped at 1.

    Storey's estimate counts junk above the median as good, so it measures π·(1 − 2q) for a junk share
    π, never more: it is a floor. q = ¼ is a junk kind the rater ranks below good pairs with AUROC
    about 0.68 (equal-variance Gaussians), so the ceiling covers any junk the rater finds better than
    that; what it ranks worse it cannot cut by score anyway."""
    return float(min(1.0, junk_share(scores, reference) / (1.0 - 2.0 * JUNK_ABOVE_MEDIAN)))


def check_reference(reference: Any) -> np.ndarray:
    """The reference scores as a float array, or a UserError saying what is wrong with them."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 1 or len(ref) < MIN_REFERENCE:
        raise UserError(f"the reference needs at least {MIN_REFERENCE} scores of trusted pairs (a 1-D array), "
                        f"got shape {ref.shape}; score the rater's validation set with infer_rater.py")
    if not np.isfinite(ref).all():
        raise UserError(f"{int((~np.isfinite(ref)).sum())} reference scores are not finite")
    return ref


def resolve_params(strategy: str, n_total: int, retention: float | int, scores: np.ndarray | None = None,
                   reference: np.ndarray | None = None, **params) -> dict[str, float]:
    """A strategy's parameters with every default filled in (the values ``select`` uses).

    Shift-Gsample keeping r = K/N: tail t = max(``DEFAULT_TAIL``, ``junk_ceiling(scores, reference)``)
    (``DEFAULT_TAIL`` without both), at most 1 − r; shift n = ``default_shift(r)``, at most 1 − t − r;
    µ = the support's centre and σ = its width / 4. Explicit values are kept (an infeasible pair is an error in ``select``)."""
    strategy, params = _check_params(strategy, params)
    k = n_select(n_total, retention)
    params = {p: float(v) for p, v in params.items()}
    if strategy == "gsample":
        return {"mu": params.get("mu", DEFAULT_MU), "sigma": params.get("sigma", DEFAULT_SIGMA)}
    if strategy == "block":
        return {"start": params["start"]} if "start" in params else {}
    if strategy != "shift_gsample":
        return {}
    r = k / n_total
    tail = params.get("tail")
    if tail is None:  # in whole rows, so that the window select() cuts holds K rows exactly
        found = junk_ceiling(scores, reference) if scores is not None and reference is not None else 0.0
        room = n_total - k - (_first_at_or_after(params["shift"], n_total) if "shift" in params else 0)
        tail = max(0, min(_tail_rows(max(DEFAULT_TAIL, found), n_total), room)) / n_total
    shift = params.get("shift")
    if shift is None:
        end = n_total - _tail_rows(tail, n_total)
        shift = max(0, min(_first_at_or_after(default_shift(r), n_total), end - k)) / n_total
    lo, hi = shift, 1.0 - tail
    return {"mu": params.get("mu", (lo + hi) / 2), "sigma": params.get("sigma", max(hi - lo, 1.0 / n_total) / 4),
            "shift": shift, "tail": tail}


def n_select(n_total: int, retention: float | int) -> int:
    """K from a retention given as a fraction in (0, 1] (float) or a count >= 1 (int)."""
    if isinstance(retention, (bool, np.bool_)):
        raise UserError(f"retention must be a fraction in (0, 1] or a count >= 1, got {retention!r}")
    if isinstance(retention, (int, np.integer)):
        k = int(retention)
    elif isinstance(retention, (float, np.floating)) and 0.0 < retention <= 1.0:
        k = int(round(float(retention) * n_total))
    else:
        raise UserError(f"retention must be a fraction in (0, 1] or a count >= 1, got {retention!r}")
    if not 1 <= k <= n_total:
        raise UserError(f"retention {retention!r} asks for {k} rows; it must select between 1 and N={n_total}")
    return k


def parse_retention(text: str) -> float | int:
    """'0.5', '50%' or '1.0' -> a fraction (float); '1000' -> a row count (int)."""
    text = text.strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100.0
    return int(text) if text.isdigit() else float(text)


def select(ratings: Any, strategy: str, retention: float | int, seed: int = 0, reference: Any = None,
           **params) -> np.ndarray:
    """Indices of the rows to keep, ordered best rank first.

    ``ratings`` is one of
      * an int N: the rows are already in rank order; the result are rank positions;
      * a DataFrame with ``rank`` (or else ``score``): the result are row positions (``iloc``);
      * a 1-D array of scores (higher = better, ties by row order): positions into it.
    ``retention`` is a fraction (float in (0, 1]) or a count (int). ``reference``: the same rater's
    scores of trusted pairs, from which Shift-Gsample's default tail is estimated (``junk_ceiling``).
    Unknown strategies, parameters or infeasible requests raise ValueError naming the fix.
    """
    n, order = _rank_order(ratings)
    k = n_select(n, retention)
    params = resolve_params(strategy, n, k, _scores(ratings), reference, **params)
    pos = _select_positions(n, k, strategy, seed, params)
    return pos if order is None else order[pos]


def inclusion_probability(n_total: int, strategy: str, retention: float | int, **params) -> np.ndarray:
    """P(rank position i is selected), shape (N,); for the sampling strategies a large-N limit.

    Gumbel-top-k keeps the K largest keys ``log w_i + G_i``; for large N the K-th key is
    nearly a constant t, so row i is kept with probability 1 − exp(−w_i e^(−t)), t solving
    Σ_i P_i = K. That is what an empirical selection histogram converges to.
    """
    k = n_select(n_total, retention)
    params = resolve_params(strategy, n_total, k, **params)
    if strategy == "random":
        return np.full(n_total, k / n_total)
    if strategy not in ("gsample", "shift_gsample"):
        p = np.zeros(n_total)
        p[_select_positions(n_total, k, strategy, 0, params)] = 1.0
        return p
    head, logw = _gaussian_logweights(n_total, k, strategy, params)
    p = np.zeros(n_total)
    p[head:head + len(logw)] = 1.0 if k == len(logw) else _threshold_inclusion(logw, k)
    return p


def sampling_weight(strategy: str, pos: np.ndarray, **params) -> tuple[np.ndarray, str] | None:
    """For the Gaussian samplers: the relative sampling weight at rank positions ``pos`` and its
    formula (for figures); None for the strategies that do not sample by weight."""
    strategy, params = _check_params(strategy, params)
    if strategy not in ("gsample", "shift_gsample"):
        return None
    mu, sigma = params.get("mu", DEFAULT_MU), params.get("sigma", DEFAULT_SIGMA)
    return np.exp(-((pos - mu) ** 2) / (2 * sigma**2)), f"weight exp(-(pos-{mu:g})²/2·{sigma:g}²)"


def discarded_head(strategy: str, fraction: float, **params) -> float | None:
    """The head (rank fraction) a strategy drops before selecting ``fraction`` of the rows:
    Shift-Gsample's shift; None for the strategies that drop none."""
    if strategy != "shift_gsample":
        return None
    shift = params.get("shift")
    return default_shift(fraction) if shift is None else shift


def discarded_tail(strategy: str, **params) -> float | None:
    """The tail (rank fraction) a strategy never selects from: Shift-Gsample's ``tail`` (pass the
    values ``resolve_params`` gives); None for the strategies that cut none."""
    if strategy != "shift_gsample":
        return None
    return params.get("tail", DEFAULT_TAIL)


def rank_histogram(positions: np.ndarray, n_total: int, bins: int = 10) -> np.ndarray:
    """How many selected rank positions fall in each of ``bins`` equal rank bands (deciles)."""
    band = np.asarray(positions, dtype=np.int64) * bins // n_total
    return np.bincount(band, minlength=bins)


def prune_table(ratings: pd.DataFrame, strategy: str, retention: float | int, seed: int = 0,
                keep_scores: bool = False, reference: Any = None, **params) -> pd.DataFrame:
    """The selected rows of a ratings table, in rank order; score/rank dropped unless kept."""
    rows = select(ratings, strategy, retention, seed, reference, **params)
    subset = ratings.iloc[rows]
    if not keep_scores:
        subset = subset.drop(columns=[c for c in ("score", "rank") if c in subset.columns])
    return subset.reset_index(drop=True)


# ----------------------------------------------------------------------------- internals
def _scores(ratings: Any) -> np.ndarray | None:
    """The scores behind a ratings argument of ``select``, when it has them."""
    if isinstance(ratings, pd.DataFrame):
        return ratings["score"].to_numpy(dtype=np.float64) if "score" in ratings.columns else None
    if isinstance(ratings, (int, np.integer)):
        return None
    return np.asarray(ratings, dtype=np.float64)


def _rank_order(ratings: Any) -> tuple[int, np.ndarray | None]:
    """(N, order) with order[rank position] = row index, or None when rows are in rank order."""
    if isinstance(ratings, (int, np.integer)) and not isinstance(ratings, (bool, np.bool_)):
        if ratings < 1:
            raise UserError(f"need at least one row to select from, got N={ratings}")
        return int(ratings), None
    if isinstance(ratings, pd.DataFrame):
        if "rank" in ratings.columns:
            return _order_from_ranks(ratings["rank"].to_numpy())
        if "score" in ratings.columns:
            return _order_from_scores(ratings["score"].to_numpy(dtype=np.float64))
        raise UserError("the ratings table needs a 'rank' or 'score' column to select from")
    return _order_from_scores(np.asarray(ratings, dtype=np.float64))


def _order_from_ranks(rank: np.ndarray) -> tuple[int, np.ndarray | None]:
    n = len(rank)
    if n == 0:
        raise UserError("the ratings table is empty")
    if np.array_equal(rank, np.arange(n)):
        return n, None
    ok = np.issubdtype(rank.dtype, np.integer) and rank.min() == 0 and rank.max() == n - 1
    if not ok or np.bincount(rank, minlength=n).max() != 1:
        raise UserError("the 'rank' column must be a permutation of 0..N-1; rebuild it with alchemist.ratings.rank_scores")
    order = np.empty(n, dtype=np.int64)
    order[rank] = np.arange(n)
    return n, order


def _order_from_scores(scores: np.ndarray) -> tuple[int, np.ndarray]:
    if scores.ndim != 1 or len(scores) == 0:
        raise UserError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise UserError(f"{int(np.isnan(scores).sum())} scores are NaN; fix or drop those rows before selecting")
    return len(scores), np.argsort(-scores, kind="stable")


def _check_params(strategy: str, params: dict) -> tuple[str, dict]:
    if strategy not in PARAMS:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    extra = sorted(set(params) - set(PARAMS[strategy]))
    if extra:
        takes = ", ".join(PARAMS[strategy]) or "none"
        raise UserError(f"strategy {strategy!r} takes no parameter {extra[0]!r} (its parameters: {takes})")
    return strategy, params


def _first_at_or_after(frac: float, n: int) -> int:
    """Smallest rank i with i / N >= frac: the exact boundary of ``pos < frac``."""
    i = min(max(math.ceil(frac * n), 0), n)
    while i > 0 and (i - 1) / n >= frac:
        i -= 1
    while i < n and i / n < frac:
        i += 1
    return i


def _select_positions(n: int, k: int, strategy: str, seed: int, params: dict) -> np.ndarray:
    strategy, params = _check_params(strategy, params)
    if strategy == "topk":
        return np.arange(k)
    if strategy == "bottomk":
        return np.arange(n - k, n)
    if strategy == "block":
        return _block(n, k, params.get("start"))
    rng = np.random.default_rng(seed)
    if strategy == "random":
        return np.sort(rng.choice(n, size=k, replace=False))
    head, logw = _gaussian_logweights(n, k, strategy, params)
    return head + np.sort(_weighted_sample(logw, k, rng))


def _block(n: int, k: int, start: float | None) -> np.ndarray:
    if start is None:  # the default window slides left when K does not fit after it
        s = min(_first_at_or_after(DEFAULT_BLOCK_START, n), n - k)
    else:
        _check_fraction("start", start)
        s = _first_at_or_after(start, n)
        if s + k > n:
            raise UserError(f"block: the window [{start}, {start} + {k}/{n}) runs past the last row; "
                             f"use start <= {(n - k) / n:.4f}")
    return np.arange(s, s + k)


def _gaussian_logweights(n: int, k: int, strategy: str, params: dict) -> tuple[int, np.ndarray]:
    """(first candidate rank, log-weights of the candidate ranks head..end-1) for gsample / shift_gsample."""
    mu = float(params.get("mu", DEFAULT_MU))
    sigma = float(params.get("sigma", DEFAULT_SIGMA))
    if not (sigma > 0 and math.isfinite(sigma) and math.isfinite(mu)):
        raise UserError(f"{strategy}: need a finite mu and sigma > 0, got mu={mu}, sigma={sigma}")
    head, end = 0, n
    if strategy == "shift_gsample":
        shift = params.get("shift")
        if shift is None:  # default by retention; never so large that fewer than K rows remain
            head = min(_first_at_or_after(default_shift(k / n), n), n - k)
        else:
            _check_fraction("shift", shift)
            head = _first_at_or_after(shift, n)
        tail = params.get("tail", 0.0)
        _check_fraction("tail", tail)
        end = n - _tail_rows(tail, n)
        if end - head < k:
            raise UserError(f"shift_gsample: keeping {k} rows is impossible between the top shift={params.get('shift')} "
                             f"and the bottom tail={tail} of N={n} ({max(0, end - head)} rows); lower the shift, "
                             "the tail or the retention")
    logw = np.arange(head, end, dtype=np.float64)
    logw /= n
    logw -= mu
    np.square(logw, out=logw)
    logw *= -0.5 / sigma**2
    return head, logw


def _tail_rows(tail: float, n: int) -> int:
    """How many of the last ranks a tail fraction cuts: ⌊tail·N⌋ (robust to the float round trip)."""
    return int(math.floor(tail * n + 1e-9))


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise UserError(f"{name} is a fraction of the ranking and must lie in [0, 1), got {value!r}")


def _weighted_sample(logw: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """K distinct indices distributed like K sequential draws without replacement, p ∝ exp(logw).

    Gumbel-top-k (Efraimidis-Spirakis in log space): keep the K largest of
    ``logw_i + Gumbel_i`` = ``logw_i - log(Exp_i)``. One pass and one partial sort, O(N).
    """
    m = len(logw)
    if k == m:
        return np.arange(m)
    keys = rng.standard_exponential(m)
    np.log(keys, out=keys)
    np.subtract(logw, keys, out=keys)
    return np.argpartition(keys, m - k)[m - k:]


def _threshold_inclusion(logw: np.ndarray, k: int) -> np.ndarray:
    from scipy.optimize import brentq

    def incl(t: float) -> np.ndarray:
        return -np.expm1(-np.exp(logw - t))

    lo = logw.min() - 20.0
    hi = logw.max() + math.log(len(logw)) + 20.0
    t = brentq(lambda t: incl(t).sum() - k, lo, hi, xtol=1e-12)
    return incl(t)
