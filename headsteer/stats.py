"""Confidence intervals shared by every subpackage: BCa bootstrap of a mean (scipy.stats.bootstrap),
one value or many rows at once, and a paired percentile bootstrap of any statistic of the rows of
a per-image matrix (the same resamples for every column, so differences between columns are
paired)."""
from __future__ import annotations

import numpy as np
from scipy import stats


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """BCa bootstrap interval of the mean of ``values``. A constant sample's interval is its value
    (BCa's acceleration is 0/0 there); where BCa still gives NaN the percentile interval is used."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    if len(v) < 2 or np.ptp(v) == 0:
        return (float(v[0]), float(v[0]))
    ci = (float("nan"), float("nan"))
    for method in ("BCa", "percentile"):
        res = stats.bootstrap((v,), np.mean, n_resamples=n_boot, confidence_level=level, method=method,
                              rng=np.random.default_rng(seed), batch=100, vectorized=True)
        ci = (float(res.confidence_interval.low), float(res.confidence_interval.high))
        if np.isfinite(ci).all():
            break
    return ci


def bootstrap_ci_rows(matrix, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """BCa intervals of the mean of each row of ``matrix`` [R, N] (N samples per row), computed
    in one vectorised scipy call; rows where that gives NaN (constant or nearly constant rows)
    fall back to ``bootstrap_ci`` one by one. Returns (low [R], high [R])."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError("matrix must be [rows, samples]")
    R, N = m.shape
    low, high = np.full(R, np.nan), np.full(R, np.nan)
    if N == 0 or R == 0:
        return low, high
    varied = np.ptp(m, axis=1) > 0
    low[~varied], high[~varied] = m[~varied, 0], m[~varied, 0]
    if N >= 2 and varied.any():
        with np.errstate(invalid="ignore", divide="ignore"):
            res = stats.bootstrap((m[varied],), np.mean, n_resamples=n_boot, confidence_level=level, method="BCa",
                                  rng=np.random.default_rng(seed), batch=100, vectorized=True, axis=-1)
        low[varied], high[varied] = res.confidence_interval.low, res.confidence_interval.high
    for r in np.flatnonzero(~(np.isfinite(low) & np.isfinite(high))):
        low[r], high[r] = bootstrap_ci(m[r], n_boot, seed, level)
    return low, high


def paired_bootstrap(per_sample, statistic, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``statistic(mean_over_resample)`` for ``n_boot`` resamples of the first axis of
    ``per_sample`` [N, ...] (with replacement, the same resample for every other index): returns
    [n_boot, ...] whatever ``statistic`` returns per resample. Use ``np.percentile`` of the result
    for a percentile interval; the point estimate is ``statistic(per_sample.mean(0))``."""
    x = np.asarray(per_sample, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    return np.stack([statistic(x[i].mean(0)) for i in idx])
