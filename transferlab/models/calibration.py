"""How well a model's probabilities are calibrated, and temperature scaling to improve them.

The measures, on the top-label probabilities (softmax of the logits):

- NLL: the mean negative log-likelihood of the true class, i.e. cross-entropy (`test/loss`).
- ECE (top-label expected calibration error): the images binned by confidence (the largest
  probability) into `ECE_BINS` equal-width bins over [0, 1]; per bin |accuracy - mean
  confidence|, weighted by the bin's share of the images. torchmetrics'
  `MulticlassCalibrationError(n_bins=15, norm="l1")` computes it.
- Brier score: the squared error of the probability vector against the one-hot label, summed
  over classes and averaged over images (0 is perfect, 2 the worst); torchmetrics has no
  multiclass one, so `MulticlassBrierScore` is ours.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one number
T > 0 divides every logit, fitted to minimize the NLL on held-out (validation) logits. Dividing
by T never changes which class is largest, so accuracy stays; T > 1 softens overconfident
probabilities. `TransferModule` measures every test; `transferlab.run.calibration` fits T after
the test and records it; `models.trained.Classifier` applies it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_calibration_error
from torchmetrics.utilities import dim_zero_cat

#: equal-width confidence bins of the ECE and the reliability diagram
ECE_BINS = 15
#: the fitted temperature is kept within these bounds: beyond them the validation NLL is flat
#: (a validation split the model gets entirely right pushes T towards 0, one at chance towards inf)
TEMPERATURE_BOUNDS = (1e-2, 1e2)


# ---- the measures -----------------------------------------------------------------------------
def brier_score(probabilities: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Sum over classes of (p_c - [c == label])^2, per image; `mean` over images (or `sum`)."""
    one_hot = F.one_hot(labels.long(), num_classes=probabilities.shape[1]).to(probabilities.dtype)
    per_image = (probabilities - one_hot).pow(2).sum(dim=1)
    return per_image.sum() if reduction == "sum" else per_image.mean()


def expected_calibration_error(probabilities: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> Tensor:
    """Top-label ECE (torchmetrics' multiclass calibration error, L1 norm)."""
    return multiclass_calibration_error(
        probabilities, labels, num_classes=probabilities.shape[1], n_bins=n_bins, norm="l1"
    )


def calibration_measures(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> dict[str, float]:
    """`nll`, `ece`, `brier` of softmax(logits / temperature)."""
    scaled = logits.double() / temperature
    probabilities = scaled.softmax(dim=1)
    return {
        "nll": float(F.cross_entropy(scaled, labels)),
        "ece": float(expected_calibration_error(probabilities, labels)),
        "brier": float(brier_score(probabilities, labels)),
    }


def reliability_bins(probabilities: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width confidence bin: `count`, mean `confidence` and `accuracy` (None for an empty bin).

    Bins are [k/n, (k+1)/n) as torchmetrics' ECE bins them; a confidence of exactly 1 is counted in
    the top bin (torchmetrics gives it a bin of its own, so the ECE it reports can differ slightly
    from one recomputed from these bins when some confidences round to 1).
    """
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).to(confidence.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=confidence.dtype).scatter_add_(0, index, torch.ones_like(confidence))
    confidence_sum = torch.zeros(n_bins, dtype=confidence.dtype).scatter_add_(0, index, confidence)
    correct_sum = torch.zeros(n_bins, dtype=confidence.dtype).scatter_add_(0, index, correct)
    return {
        "edges": edges.tolist(),
        "count": [int(n) for n in count.tolist()],
        "confidence": [float(s / n) if n else None for s, n in zip(confidence_sum.tolist(), count.tolist())],
        "accuracy": [float(s / n) if n else None for s, n in zip(correct_sum.tolist(), count.tolist())],
    }


class MulticlassBrierScore(Metric):
    """The multiclass Brier score (see `brier_score`), accumulated over batches (and DDP ranks)."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probabilities: Tensor, labels: Tensor) -> None:
        self.total += brier_score(probabilities.double(), labels, reduction="sum")
        self.count += labels.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class LogitsAndLabels(Metric):
    """Every logit and label of an evaluation, gathered over DDP ranks: what the temperature and the
    reliability diagram of a test are computed from after it (`transferlab.run.calibration`)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        self.logits.append(logits.detach().float())
        self.labels.append(labels.detach())

    def compute(self) -> tuple[Tensor, Tensor]:
        return dim_zero_cat(self.logits), dim_zero_cat(self.labels)


# ---- temperature scaling ----------------------------------------------------------------------
def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimizing the mean NLL of softmax(logits / T): L-BFGS on log T (strong-Wolfe line
    search, full batch, float64, from T = 1), kept within TEMPERATURE_BOUNDS."""
    if logits.shape[0] == 0:
        raise ValueError("fit_temperature: no logits to fit on")
    if not torch.isfinite(logits).all():
        raise ValueError("fit_temperature: the logits are not all finite numbers")
    # copies: tensors made under torch.inference_mode (an evaluation loop's) cannot take part in autograd
    x = logits.detach().double().cpu().clone()
    y = labels.detach().long().cpu().clone()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)

    def objective() -> Tensor:
        solver.zero_grad()
        # clamped inside the objective too: a line search that steps far out sees a flat NLL, not overflow
        loss = F.cross_entropy(x / log_t.clamp(low, high).exp(), y)
        loss.backward()
        return loss

    solver.step(objective)
    return float(log_t.detach().clamp(low, high).exp())
