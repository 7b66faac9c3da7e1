"""Uncertainty for every comparison a figure makes: binomial intervals and bootstraps.

A figure that compares two numbers has to show how far each could move under resampling, or the
comparison cannot be read. The analyses use three tools, kept here so they are computed one way:

* `wilson`: the Wilson score interval of a proportion k / n (accuracies, shares of rollouts). It
  stays inside [0, 1] and behaves at k = 0 or k = n, unlike the normal approximation.
* `cluster_bootstrap`: replicates of a ratio of sums over resampled *units* (rollouts, problems),
  the unit of dependence: tokens of one rollout are not independent draws. Returns the replicate
  values so callers can apply any interval.
* `percentile_interval` / `basic_interval`: the plain percentile interval, and the basic
  (bias-corrected, "reverse percentile") interval [2 t - q_hi, 2 t - q_lo] with the bias-corrected
  estimate 2 t - mean(t*). Plug-in estimators that are biased upward by finite samples (the
  Jensen-Shannon divergence of sparse counts) need the latter: their bootstrap distribution sits
  above the estimate, so a percentile interval can exclude its own point estimate.

All functions are pure and seeded.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if abs(level - 0.95) < 1e-12:
        return Z95
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def wilson(k: np.ndarray | float, n: np.ndarray | float, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of k successes in n trials (arrays broadcast); NaN where n = 0."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z = _z(level)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = np.where(n > 0, np.clip(centre - half, 0.0, 1.0), np.nan)
    hi = np.where(n > 0, np.clip(centre + half, 0.0, 1.0), np.nan)
    return lo, hi


def multinomial_weights(n_units: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n_units] counts: how often each unit is drawn in each bootstrap replicate."""
    if n_units == 0:
        return np.zeros((n_boot, 0))
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot).astype(np.float64)


def cluster_bootstrap(num_U: np.ndarray, den_U: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0
                      ) -> np.ndarray:
    """Replicates of sum(num) / sum(den) (den default 1 per unit: the mean) with the units resampled
    with replacement; num may carry trailing dimensions (one ratio per column)."""
    num = np.asarray(num_U, dtype=np.float64)
    den = np.ones(num.shape[0]) if den_U is None else np.asarray(den_U, dtype=np.float64)
    W = multinomial_weights(num.shape[0], n_boot, np.random.default_rng(seed))
    top = np.tensordot(W, num, axes=(1, 0))
    bottom = W @ den
    with np.errstate(invalid="ignore", divide="ignore"):
        return top / bottom.reshape((-1,) + (1,) * (top.ndim - 1))


def percentile_interval(reps: np.ndarray, level: float = 0.95, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The (1 - level)/2 and (1 + level)/2 quantiles of the finite replicates along ``axis``."""
    a = (1 - level) / 2
    r = np.asarray(reps, dtype=np.float64)
    lo = np.nanquantile(r, a, axis=axis)
    hi = np.nanquantile(r, 1 - a, axis=axis)
    return lo, hi


def basic_interval(point: float, reps: np.ndarray, level: float = 0.95, bounds: tuple[float, float] = (-math.inf,
                   math.inf)) -> dict[str, float]:
    """Bias-corrected estimate 2 t - mean(t*) and the basic bootstrap interval [2 t - q_hi, 2 t - q_lo],
    both clipped to ``bounds`` (e.g. [0, ln 2] for a JS divergence), plus the raw percentiles."""
    r = np.asarray(reps, dtype=np.float64)
    r = r[np.isfinite(r)]
    if not r.size or not math.isfinite(point):
        nan = math.nan
        return {"estimate": nan, "lo": nan, "hi": nan, "bias": nan, "pct_lo": nan, "pct_hi": nan, "n_boot": 0}
    q_lo, q_hi = percentile_interval(r, level)
    lo_b, hi_b = bounds
    bias = float(r.mean() - point)
    return {"estimate": float(np.clip(point - bias, lo_b, hi_b)), "lo": float(np.clip(2 * point - q_hi, lo_b, hi_b)),
            "hi": float(np.clip(2 * point - q_lo, lo_b, hi_b)), "bias": bias, "pct_lo": float(q_lo),
            "pct_hi": float(q_hi), "n_boot": int(r.size)}
