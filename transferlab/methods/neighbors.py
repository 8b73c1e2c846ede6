"""`mode=knn` and `mode=ncm`: classifiers that are the training set's features, no epochs.

Like `mode=linear_probe` (methods/probe.py) they run on the frozen backbone's cached features and
solve instead of a fit (`head_solve: instead_of_fit`, `solver: knn | ncm` in conf/mode/), so they
share its checks: head=linear (replaced here), no augmentation, nothing to resume, whole splits.

- kNN (`models.heads.KnnHead`): DINOv2's evaluation protocol (Oquab et al. 2023): cosine
  similarity, the k nearest training images vote with weight exp(similarity / T), T = 0.07; k is
  chosen on the validation split from `mode.k_grid` (each value capped at the number of training
  images; ties go to the smaller k). `train/*` leaves each image out of its own vote.
- NCM (`models.heads.NcmHead`): cosine similarity to each class's normalized mean of the
  normalized training features, softmax(similarity / T) as probabilities, T = `mode.temperature`.

The "head" of either is what it stores (the training features and labels, or the class means):
it goes into the checkpoint like any head's weights, so `predict`, `export` and
`load_from_checkpoint` read these runs as any other.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from transferlab.models.heads import KnnHead, NcmHead, votes_as_logits
from transferlab.utils.errors import UserError

log = logging.getLogger("transferlab")

NEIGHBOR_SOLVERS = ("knn", "ncm")
#: rows of similarities computed at once (a chunk of 256 x 50,000 training images is 51 MB)
CHUNK = 256


def is_neighbor_mode(mode: Any) -> bool:
    return str(mode.get("solver", "lbfgs")) in NEIGHBOR_SOLVERS


@dataclass
class NeighborClassifier:
    solver: str  # knn | ncm
    temperature: float
    k_grid: list[int] = field(default_factory=list)  # knn only


def neighbors_from_config(mode: Any) -> NeighborClassifier:
    """The classifier `mode` describes (`mode.solver`, `mode.temperature`, `mode.k_grid`), checked."""
    solver = str(mode.get("solver"))
    temperature = mode.get("temperature")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise UserError(
            f"mode.temperature={temperature!r} must be a positive finite number (the softmax temperature of "
            f"mode={mode.get('name')}; DINOv2's kNN uses 0.07)"
        )
    if solver == "ncm":
        return NeighborClassifier("ncm", float(temperature))
    grid = mode.get("k_grid")
    values = list(grid) if grid is not None and not isinstance(grid, (str, numbers.Number)) else None
    if not values or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in values):
        raise UserError(
            f"mode.k_grid={grid!r} must be a non-empty list of integers >= 1 (the numbers of neighbours "
            "to choose from on validation, e.g. [10,20,100,200])"
        )
    return NeighborClassifier("knn", float(temperature), [int(k) for k in values])


# ---- the solve ----------------------------------------------------------------------------------
def solve_neighbors_instead_of_fit(
    trainer, model, datamodule, classifier: NeighborClassifier, checkpoint: Path, test: bool
) -> dict:
    """Store, choose k (kNN), validate, checkpoint, test; returns the metrics (written like any run's)."""
    from transferlab.callbacks.guards import ProbeRecord  # heavy: Lightning (the checks import this module)
    from transferlab.methods.modes import freeze
    from transferlab.methods.probe import (
        validate_save_and_test,
    )  # probe checks this mode's settings through here

    freeze([model.backbone])  # the backbone never trains; the head has no parameters at all
    started = time.perf_counter()
    train, val, num_classes = datamodule.train, datamodule.val, datamodule.num_classes
    features, labels = train.images.float(), train.labels
    if classifier.solver == "knn":
        k, record = choose_k(classifier, features, labels, val.images.float(), val.labels, num_classes)
        head = KnnHead(features.shape[1], num_classes, features.shape[0], k, classifier.temperature)
        node = {"memory_size": int(features.shape[0]), "k": k}
    else:
        record = {}
        head = NcmHead(features.shape[1], num_classes, classifier.temperature)
        node = {}
    head.store(features, labels)
    model.head = head
    # what load_from_checkpoint rebuilds: this head, not the config's linear one (build.build_model)
    model.architecture["head"] = {
        "_target_": f"transferlab.models.heads.{classifier.solver}_head",
        "in_features": int(features.shape[1]),
        "num_classes": int(num_classes),
        "temperature": classifier.temperature,
        **node,
    }
    record = {"solver": classifier.solver, "temperature": classifier.temperature, **record}
    trainer.callbacks.append(ProbeRecord(record))  # into the checkpoint and run_info.json
    solve_time = time.perf_counter() - started
    train_loss, train_acc = training_metrics(head, features, labels)
    metrics = {"train/loss": train_loss, "train/acc": train_acc}
    metrics.update(validate_save_and_test(trainer, model, datamodule, checkpoint, test))
    metrics.update(epochs=0, train_time_s=round(solve_time, 3))
    if classifier.solver == "knn":
        metrics["k"] = head.k
    return metrics


def choose_k(
    classifier: NeighborClassifier,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
) -> tuple[int, dict]:
    """The k of `k_grid` (capped at the training set's size) with the best validation accuracy."""
    n = train_x.shape[0]
    grid = sorted({min(k, n) for k in classifier.k_grid})
    if any(k > n for k in classifier.k_grid):
        log.info("kNN: k capped at the %d training images: grid %s", n, grid)
    memory = F.normalize(train_x, dim=1)
    correct = dict.fromkeys(grid, 0)
    for rows in torch.split(torch.arange(val_x.shape[0]), CHUNK):
        similarity = F.normalize(val_x[rows], dim=1) @ memory.T
        for k in grid:
            logits = votes_as_logits(similarity, train_y, k, classifier.temperature, num_classes)
            correct[k] += int((logits.argmax(1) == val_y[rows]).sum())
    accuracy = {k: correct[k] / max(1, val_x.shape[0]) for k in grid}
    best = max(grid, key=lambda k: (accuracy[k], -k))  # ties: the smaller k
    log.info(
        "kNN: k=%d chosen on validation (val acc %.4f; grid %s; T=%g)",
        best,
        accuracy[best],
        ", ".join(f"{k}: {accuracy[k]:.4f}" for k in grid),
        classifier.temperature,
    )
    return best, {"k": best, "k_grid": grid, "val_acc": [accuracy[k] for k in grid]}


@torch.no_grad()
def training_metrics(head, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(train/loss, train/acc); a kNN head's with each image left out of its own vote."""
    if not isinstance(head, KnnHead):
        logits = head(features)
        return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()
    loss, correct = 0.0, 0
    for rows in torch.split(torch.arange(features.shape[0]), CHUNK):
        similarity = F.normalize(features[rows], dim=1) @ head.memory.T
        similarity[torch.arange(len(rows)), rows] = -math.inf  # not its own neighbour
        logits = votes_as_logits(similarity, head.memory_labels, head.k, head.temperature, head.num_classes)
        loss += F.cross_entropy(logits, labels[rows], reduction="sum").item()
        correct += int((logits.argmax(1) == labels[rows]).sum())
    return loss / features.shape[0], correct / features.shape[0]
