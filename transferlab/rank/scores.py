"""Transferability scores: how well a pretrained model should transfer, before any fine-tuning.

No Lightning: every function takes arrays and returns numbers.

- `logme`: LogME (You et al. 2021), the log evidence of a Bayesian linear model on the features.
- `h_score`: H-score (Bao et al. 2019), with Ledoit-Wolf shrinkage of the feature covariance
  by default (Ibrahim et al. 2022): with fewer images than feature dimensions the plain score
  with a pseudo-inverse is C - 1 for every backbone (see `h_score`).
- `leep`: LEEP (Nguyen et al. 2020) and `nce`: NCE (Tran et al. 2019), from the source model's
  class probabilities on the target images.
- `kendall_tau_b`, `weighted_tau`: the agreement of a ranking with measured accuracies (scipy's).

Numpy (float64) for the scores; higher is better for every score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: LogME's fixed-point iteration stops when alpha and beta change by less than this, relatively
LOGME_TOLERANCE = 1e-8
LOGME_MAX_ITERATIONS = 1000


# ---- checks -------------------------------------------------------------------------------
def _features_and_labels(features, labels) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) float64 features and (n,) int labels 0..C-1 with at least two classes; else ValueError."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.ndim != 1 or f.shape[0] != y.shape[0]:
        raise ValueError(f"features must be (n, D) and labels (n,); got {f.shape} and {y.shape}")
    if f.shape[0] < 2 or not np.all(np.isfinite(f)):
        raise ValueError("features must hold at least two rows of finite numbers")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError("labels must be non-negative integers")
    if len(np.unique(y)) < 2:
        raise ValueError("labels must hold at least two classes")
    return f, y.astype(np.int64)


def _probabilities_and_labels(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0] or p.shape[0] == 0:
        raise ValueError(f"source probabilities must be (n, Z) and labels (n,); got {p.shape} and {y.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0 or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError(
            "source probabilities must be non-negative rows that sum to 1 (a softmax, not logits)"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError("labels must be non-negative integers")
    return p, y.astype(np.int64)


def softmax(logits) -> np.ndarray:
    """Row-wise softmax in float64 (the source model's class probabilities from its logits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ---- LogME --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spectrum:
    """The features in the eigenbasis of F^T F: what LogME's evidence depends on.

    `sigma`: the k nonzero eigenvalues of F^T F (squared singular values of F);
    `z`: (k, C) the targets' coordinates along the matching left singular vectors u_i of F;
    `outside`: (C,) the squared norm of each target outside F's column space (y^T y - sum z^2);
    `n`, `dim`: images and feature dimensions (dim - k eigenvalues are zero).
    """

    sigma: np.ndarray
    z: np.ndarray
    outside: np.ndarray
    n: int
    dim: int


def spectrum(features: np.ndarray, targets: np.ndarray) -> Spectrum:
    """Eigendecomposition of the smaller Gram matrix (F^T F when n >= D, else F F^T): D x D or n x n."""
    f = np.asarray(features, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64).reshape(f.shape[0], -1)
    n, dim = f.shape
    if n >= dim:
        sigma, v = np.linalg.eigh(f.T @ f)
        keep = sigma > _rank_tolerance(sigma, n, dim)
        sigma, v = sigma[keep], v[:, keep]
        z = (v.T @ (f.T @ t)) / np.sqrt(sigma)[:, None]  # u_i = F v_i / sqrt(sigma_i)
    else:
        sigma, u = np.linalg.eigh(f @ f.T)
        keep = sigma > _rank_tolerance(sigma, n, dim)
        sigma, u = sigma[keep], u[:, keep]
        z = u.T @ t
    outside = np.maximum((t * t).sum(axis=0) - (z * z).sum(axis=0), 0.0)
    return Spectrum(sigma, z, outside, n, dim)


def _rank_tolerance(eigenvalues: np.ndarray, n: int, dim: int) -> float:
    # numpy's matrix_rank rule, on eigenvalues of a Gram matrix
    return float(eigenvalues.max(initial=0.0)) * max(n, dim) * np.finfo(np.float64).eps


def log_evidence(s: Spectrum, column: int, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of the Bayesian linear model y = F w + noise, w ~ N(0, 1/alpha),
    noise ~ N(0, 1/beta), for target `column` (not divided by n):

        D/2 log alpha + n/2 log beta - n/2 log 2pi - beta/2 ||y - F m||^2 - alpha/2 ||m||^2 - 1/2 log|A|

    with A = alpha I + beta F^T F and m = beta A^-1 F^T y (You et al. 2021, eq. 2)."""
    z2 = s.z[:, column] ** 2
    scale = alpha + beta * s.sigma
    m2 = float((beta**2 * s.sigma * z2 / scale**2).sum())
    residual = float(((alpha / scale) ** 2 * z2).sum() + s.outside[column])
    log_det = float(np.log(scale).sum() + (s.dim - len(s.sigma)) * math.log(alpha))
    return (
        s.dim / 2 * math.log(alpha)
        + s.n / 2 * math.log(beta)
        - s.n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual
        - alpha / 2 * m2
        - log_det / 2
    )


def maximize_evidence(s: Spectrum, column: int) -> tuple[float, float]:
    """LogME's fixed point (MacKay's updates): alpha = gamma / ||m||^2, beta = (n - gamma) / ||y - F m||^2,
    gamma = sum beta sigma_i / (alpha + beta sigma_i), from alpha = beta = 1.

    It stops when alpha and beta settle, or when the evidence does: where the maximum lies at a
    boundary (features that fit the labels exactly send beta to infinity, features that explain
    nothing send alpha there) the evidence converges while alpha or beta keep growing.
    """
    alpha, beta = 1.0, 1.0
    z2 = s.z[:, column] ** 2
    unexplained_dims = s.n - len(s.sigma)  # n - k >= 0
    evidence = log_evidence(s, column, alpha, beta)
    for _ in range(LOGME_MAX_ITERATIONS):
        scale = alpha + beta * s.sigma
        gamma = float((beta * s.sigma / scale).sum())
        # n - gamma as a sum of non-negative terms: exact also when gamma is within rounding of n
        n_minus_gamma = unexplained_dims + float((alpha / scale).sum())
        m2 = float((beta**2 * s.sigma * z2 / scale**2).sum())
        residual = float(((alpha / scale) ** 2 * z2).sum() + s.outside[column])
        if m2 <= 0 or residual <= 0:
            break  # y = 0, or fitted exactly: the current values are as far as the updates can go
        new_alpha, new_beta = gamma / m2, n_minus_gamma / residual
        if not (math.isfinite(new_alpha) and math.isfinite(new_beta) and new_alpha > 0 and new_beta > 0):
            break
        new_evidence = log_evidence(s, column, new_alpha, new_beta)
        settled = (
            abs(new_alpha - alpha) <= LOGME_TOLERANCE * alpha
            and abs(new_beta - beta) <= LOGME_TOLERANCE * beta
        )
        flat = abs(new_evidence - evidence) <= 1e-12 * max(1.0, abs(evidence))
        alpha, beta, evidence = new_alpha, new_beta, new_evidence
        if settled or flat:
            break
    return alpha, beta


def logme(features, labels) -> float:
    """LogME: for each class, the maximized log evidence / n of its one-vs-rest 0/1 target on the
    features; the mean over classes. Larger (less negative) means the features explain the labels
    linearly with a simpler model."""
    f, y = _features_and_labels(features, labels)
    classes = np.unique(y)
    one_vs_rest = (y[:, None] == classes[None, :]).astype(np.float64)
    s = spectrum(f, one_vs_rest)
    evidences = [log_evidence(s, c, *maximize_evidence(s, c)) / s.n for c in range(len(classes))]
    return float(np.mean(evidences))


# ---- H-score ------------------------------------------------------------------------------
def h_score(features, labels, shrinkage: float | str = "ledoit_wolf") -> float:
    """H-score tr(cov(f)^-1 cov(E[f|y])) (Bao et al. 2019), both covariances over the images (1/n).

    `shrinkage`: `ledoit_wolf` (default) is the regularized H-score of Ibrahim et al. 2022,
    tr(cov_d(f)^-1 (1 - d) cov(E[f|y])) with cov_d(f) = (1 - d) cov(f) + d (tr cov(f) / D) I and
    the Ledoit-Wolf d; a number in [0, 1] fixes d; 0 is Bao et al.'s score with a pseudo-inverse.
    Why shrink: with n <= D (50 images per class, 1,280 features) the pseudo-inverse score is
    exactly C - 1 for any features in general position, so it cannot rank anything. Between 0
    and C - 1 for every d; invariant to scaling the features by a constant.
    """
    f, y = _features_and_labels(features, labels)
    centered = f - f.mean(axis=0)
    cov = centered.T @ centered / len(f)
    class_means = np.zeros_like(centered)
    for c in np.unique(y):
        class_means[y == c] = centered[y == c].mean(axis=0)
    between = class_means.T @ class_means / len(f)
    d = ledoit_wolf_shrinkage(centered, cov) if shrinkage == "ledoit_wolf" else float(shrinkage)
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {shrinkage!r}")
    mu = np.trace(cov) / cov.shape[0]
    shrunk = (1 - d) * cov + d * mu * np.eye(cov.shape[0])
    return float(np.trace(np.linalg.pinv(shrunk, hermitian=True) @ ((1 - d) * between)))


def ledoit_wolf_shrinkage(centered: np.ndarray, s: np.ndarray | None = None) -> float:
    """Ledoit & Wolf's (2004) optimal weight d of the scaled identity mu I in (1 - d) S + d mu I,
    S = X^T X / n of centered X (the same formula as scikit-learn's `ledoit_wolf_shrinkage`):

        d = min(b2, d2) / d2,  d2 = ||S - mu I||_F^2 / D,  b2 = (sum_k ||x_k x_k^T - S||_F^2 / n^2) / D
    """
    x = np.asarray(centered, dtype=np.float64)
    n, dim = x.shape
    s = x.T @ x / n if s is None else s  # the caller's S when it has it (h_score): the costly product once
    mu = np.trace(s) / dim
    d2 = ((s - mu * np.eye(dim)) ** 2).sum() / dim
    # sum_k ||x_k x_k^T - S||^2 = sum_k ||x_k||^4 - n ||S||^2
    b2 = (((x * x).sum(axis=1) ** 2).sum() - n * (s**2).sum()) / n**2 / dim
    if d2 <= 0:
        return 0.0  # S is already a multiple of the identity
    return float(min(max(b2, 0.0), d2) / d2)


# ---- LEEP and NCE -------------------------------------------------------------------------
def leep(source_probabilities, labels) -> float:
    """LEEP: (1/n) sum_i log sum_z P(y_i | z) theta(x_i)_z, with theta the source model's
    probabilities over its classes z and P(y | z) = P(y, z) / P(z) from the empirical joint
    P(y, z) = (1/n) sum_{i: y_i = y} theta(x_i)_z. Always <= 0."""
    p, y = _probabilities_and_labels(source_probabilities, labels)
    n = len(y)
    joint = np.zeros((y.max() + 1, p.shape[1]))
    np.add.at(joint, y, p)
    joint /= n
    marginal = joint.sum(axis=0)
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)  # P(y | z)
    expected = (p * conditional[y]).sum(axis=1)  # sum_z P(y_i | z) theta(x_i)_z
    return float(np.log(expected).mean())


def nce(source_probabilities, labels) -> float:
    """NCE: -H(Y | Z) with Z the source model's most probable class (its dummy label),
    sum_{y,z} P(y, z) log P(y | z) from the counts. Always <= 0 (0: Z determines Y)."""
    p, y = _probabilities_and_labels(source_probabilities, labels)
    z = p.argmax(axis=1)
    counts = np.zeros((y.max() + 1, p.shape[1]))
    np.add.at(counts, (y, z), 1.0)
    joint = counts / len(y)
    marginal = joint.sum(axis=0)
    nonzero = joint > 0
    conditional = joint[nonzero] / np.broadcast_to(marginal, joint.shape)[nonzero]
    return float((joint[nonzero] * np.log(conditional)).sum())


# ---- agreement ----------------------------------------------------------------------------
def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b of two paired sequences (e.g. a score per backbone and its fine-tuned accuracy),
    scipy.stats.kendalltau's: (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)),
    n0 = n (n - 1) / 2. NaN when either sequence is constant (no order to agree with)."""
    a, b = _paired_sequences(x, y, "kendall_tau_b")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    from scipy.stats import kendalltau  # heavy: scipy, only to compare a ranking with accuracies

    return float(kendalltau(a, b, variant="b").statistic)


def weighted_tau(x, y) -> float:
    """scipy.stats.weightedtau (hyperbolic weights 1 / (rank + 1), the top of both orders weighs most):
    the weighted Kendall tau that published transferability tables report. NaN when either is constant."""
    a, b = _paired_sequences(x, y, "weighted_tau")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    from scipy.stats import weightedtau  # heavy: scipy (see kendall_tau_b)

    return float(weightedtau(a, b).statistic)


def _paired_sequences(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"{name} needs two sequences of the same length >= 2; got {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError(f"{name} needs finite numbers (drop the backbones without a score first)")
    return a, b


def ranks(values) -> list[int | None]:
    """Rank 1 = the highest value; equal values share the better rank; NaN gets None."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return [None if v is None or not math.isfinite(v) else 1 + sum(w > v for w in finite) for v in values]
