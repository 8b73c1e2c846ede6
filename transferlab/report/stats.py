"""What a comparison can claim: intervals over seeds, paired tests, crossing points of fitted lines.

Numbers in, numbers out (numpy float64, scipy for the t distribution and the paired t-test):

- `summarize`: n, mean, sample std and a 95% interval of the mean over a setting's seeds, a
  t-interval (`t_interval`) or a percentile bootstrap (`bootstrap_interval`, 10,000 resamples).
- `paired_difference`: the mean of a - b over pairs of runs, its interval and a two-sided p-value,
  from the paired t-test or the exact sign-flip permutation test (`sign_flip_p`).
- `fit_lines` and `crossover`: least-squares lines y = intercept + slope * log(x) and where two
  of them cross inside the measured range, with a bootstrap over seeds for the interval.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: how a mean's interval is computed (`report --ci`), and which paired test (`--paired-test`)
CI_METHODS = ("t", "bootstrap")
PAIRED_TESTS = ("t", "permutation")
LEVEL = 0.95
RESAMPLES = 10_000
#: below this many seeds a percentile bootstrap interval is too narrow to trust
BOOTSTRAP_MIN_SEEDS = 5
#: the sign-flip test enumerates all 2^n sign patterns up to this many pairs, then samples them
EXACT_SIGN_FLIPS = 20
#: two values this close (relative) count as equal: sums of the same numbers in another order
TIES = 1e-9


@dataclass(frozen=True)
class Options:
    """The report's statistics settings (its command-line flags)."""

    ci: str = "t"
    bootstrap_seed: int = 0
    arms: str = "mode"
    paired_test: str = "t"


# ---- a mean over seeds -----------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """A setting's values over its seeds; std, low and high are None for a single value."""

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None


def summarize(values: Sequence[float], ci: str = "t", seed: int = 0) -> Summary:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Summary(0, None, None, None, None)
    if x.size == 1:
        return Summary(1, float(x[0]), None, None, None)
    low, high = interval(x, ci, seed)
    return Summary(int(x.size), float(x.mean()), float(x.std(ddof=1)), low, high)


def interval(values: Sequence[float], ci: str = "t", seed: int = 0) -> tuple[float, float]:
    if ci == "t":
        return t_interval(values)
    if ci == "bootstrap":
        return bootstrap_interval(values, seed)
    raise ValueError(f"ci must be one of {', '.join(CI_METHODS)}, got {ci!r}")


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """mean ± t(1 - (1 - level) / 2, n - 1) * std / sqrt(n), std the sample std (n >= 2)."""
    from scipy.stats import (
        t,  # heavy: scipy, only when an interval is computed (import and --help stay quick)
    )

    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ValueError("a t-interval needs at least two values")
    half = float(t.ppf(1 - (1 - level) / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    mean = float(x.mean())
    return mean - half, mean + half


def bootstrap_interval(
    values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap of the mean: `resamples` draws of n values with replacement, all at once."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ValueError("a bootstrap interval needs at least two values")
    draws = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    means = x[draws].mean(axis=1)
    low, high = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


# ---- a paired difference ---------------------------------------------------------------------
@dataclass(frozen=True)
class PairedResult:
    """a - b over pairs: mean, interval, p-value (None with `reason` when there is none)."""

    n_pairs: int
    mean_diff: float
    low: float | None
    high: float | None
    p_value: float | None
    test: str
    reason: str = ""


TEST_NAMES = {"t": "paired t-test", "permutation": "sign-flip permutation"}


def paired_difference(
    a: Sequence[float], b: Sequence[float], test: str = "t", ci: str = "t", seed: int = 0
) -> PairedResult:
    """The two-sided paired test of mean(a - b) = 0, and the interval of that mean (`ci`)."""
    if test not in PAIRED_TESTS:
        raise ValueError(f"test must be one of {', '.join(PAIRED_TESTS)}, got {test!r}")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"paired values must be two sequences of the same length >= 1; got {a.shape} and {b.shape}"
        )
    d = a - b
    n, mean = int(d.size), float(d.mean())
    name = TEST_NAMES[test] if test == "t" else sign_flip_name(n)
    if n == 1:
        return PairedResult(1, mean, None, None, None, name, "one pair: no spread to test against")
    low, high = interval(d, ci, seed)
    if test == "t":
        if _constant(d):
            return PairedResult(
                n,
                mean,
                low,
                high,
                None,
                name,
                f"the {n} differences are all equal: no spread to test against",
            )
        from scipy.stats import ttest_rel  # heavy: scipy (see t_interval)

        with (
            warnings.catch_warnings()
        ):  # nearly equal differences: scipy warns of lost precision, the p stands
            warnings.simplefilter("ignore", RuntimeWarning)
            p_value = float(ttest_rel(a, b).pvalue)
        return PairedResult(n, mean, low, high, p_value, name)
    return PairedResult(n, mean, low, high, sign_flip_p(d, seed), name)


def sign_flip_name(n: int) -> str:
    exact = n <= EXACT_SIGN_FLIPS
    return f"sign-flip permutation ({'exact' if exact else f'{RESAMPLES:,} random sign patterns'})"


def _constant(x: np.ndarray) -> bool:
    return bool(np.ptp(x) <= TIES * max(1.0, float(np.abs(x).max())))


def sign_flip_p(differences: Sequence[float], seed: int = 0) -> float:
    """Two-sided p of the sign-flip test: the share of sign patterns whose mean is at least as far
    from 0 as the observed one (the observed pattern counts). All 2^n patterns up to
    EXACT_SIGN_FLIPS pairs; above, RESAMPLES random ones plus the observed."""
    d = np.asarray(differences, dtype=np.float64)
    n = d.size
    if n <= EXACT_SIGN_FLIPS:
        patterns = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1) * 2.0 - 1.0
    else:
        rng = np.random.default_rng(seed)
        patterns = np.vstack([np.ones(n), rng.choice([-1.0, 1.0], size=(RESAMPLES, n))])
    observed = abs(float(d.mean()))
    means = np.abs(patterns @ d) / n
    return float(np.mean(means >= observed - TIES * max(1.0, observed)))


def smallest_sign_flip_p(n_pairs: int) -> float:
    """The smallest two-sided p the exact sign-flip test can give with n pairs: 2 / 2^n."""
    return 2.0 / 2**n_pairs


# ---- lines against log size and where they cross -----------------------------------------------
def fit_lines(log_x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y = intercept + slope * log_x along the last axis of `y` (any leading shape)."""
    xc = log_x - log_x.mean()
    slope = ((y - y.mean(axis=-1, keepdims=True)) * xc).sum(axis=-1) / (xc * xc).sum()
    return y.mean(axis=-1) - slope * log_x.mean(), slope


def crossing_log_x(intercepts_a, slopes_a, intercepts_b, slopes_b) -> np.ndarray:
    """Where line a meets line b (log x); NaN for parallel lines."""
    d_slope = np.asarray(slopes_a, dtype=np.float64) - slopes_b
    d_intercept = np.asarray(intercepts_a, dtype=np.float64) - intercepts_b
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -d_intercept / d_slope
    return np.where(np.abs(d_slope) > 0, t, np.nan)


@dataclass(frozen=True)
class Crossover:
    """Where arm a's fitted line crosses arm b's, inside the sizes measured (else n_cross None)."""

    n_cross: float | None
    low: float | None
    high: float | None
    share_crossing: float | None  # of the bootstrap replicates, None without a bootstrap (one seed)
    a_overtakes: bool | None  # True: a is below b before the crossing and above after it
    a_above: bool | None  # without a crossing: a's line is above b's over the whole range
    x_min: float
    x_max: float
    n_seeds: int
    fit_a: tuple[float, float] = (math.nan, math.nan)  # (intercept, slope) on log x
    fit_b: tuple[float, float] = (math.nan, math.nan)


def crossover(
    sizes: Sequence[float], a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = RESAMPLES
) -> Crossover:
    """Two arms' values `a`, `b` of shape (sizes, seeds), the same seed in the same column.

    The lines are fitted on the seed means at each size; the bootstrap resamples seeds (columns),
    the same draw for both arms and every size. The interval is the percentile interval of the
    crossing point over the replicates whose lines cross inside the measured sizes;
    `share_crossing` says how many did. Nothing is extrapolated.
    """
    x = np.asarray(sizes, dtype=np.float64)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or len(np.unique(x)) < 3 or np.any(x <= 0):
        raise ValueError("a crossover needs at least 3 different positive sizes")
    if a.shape != b.shape or a.shape[0] != x.size or a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"values must be (sizes, seeds) for both arms; got {a.shape} and {b.shape}")
    log_x = np.log(x)
    lo, hi = float(log_x.min()), float(log_x.max())
    ia, sa = fit_lines(log_x, a.mean(axis=1))
    ib, sb = fit_lines(log_x, b.mean(axis=1))
    t = float(crossing_log_x(ia, sa, ib, sb))
    inside = math.isfinite(t) and lo <= t <= hi
    n_seeds = a.shape[1]
    share = low = high = None
    if n_seeds >= 2:
        draws = np.random.default_rng(seed).integers(0, n_seeds, size=(resamples, n_seeds))
        mean_a = a[:, draws].mean(axis=-1).T  # (resamples, sizes)
        mean_b = b[:, draws].mean(axis=-1).T
        ts = crossing_log_x(*fit_lines(log_x, mean_a), *fit_lines(log_x, mean_b))
        crosses = np.isfinite(ts) & (ts >= lo) & (ts <= hi)
        share = float(crosses.mean())
        if crosses.any():
            low, high = (
                float(v)
                for v in np.exp(np.percentile(ts[crosses], [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2]))
            )
    middle = (lo + hi) / 2
    return Crossover(
        n_cross=math.exp(t) if inside else None,
        low=low,
        high=high,
        share_crossing=share,
        a_overtakes=bool(sa > sb) if inside else None,
        a_above=None if inside else bool(ia + sa * middle > ib + sb * middle),
        x_min=float(x.min()),
        x_max=float(x.max()),
        n_seeds=n_seeds,
        fit_a=(float(ia), float(sa)),
        fit_b=(float(ib), float(sb)),
    )
