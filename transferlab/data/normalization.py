"""One rule for how a run normalizes its images (timm's `resolve_data_config` is the model):

1. `data.normalization` when the config sets it (`imagenet`, `cifar`/`dataset`, `none`);
2. else the weights' own: a torchvision weights enum, a timm `pretrained_cfg`, the mean/std a
   transferlab checkpoint recorded, or the published weights file a plain file is named after;
3. else the dataset's statistics (random init, or weights that do not say; the log says which).

`resolve_normalization` is the only place this is decided; the data module calls it once
per run and the choice is logged and recorded in checkpoints (`data_info`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from transferlab.utils.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: `data.normalization` values: a fixed name, or the dataset's own statistics
CHOICES = ("imagenet", "cifar", "dataset", "none")
DATASET_STATS = ("cifar", "dataset")

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Normalization:
    """The mean/std a run uses, what to call them, and why they were chosen."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    reason: str


def check_choice(requested: str | None) -> None:
    if requested is not None and str(requested) not in CHOICES:
        raise UserError(
            f"data.normalization={requested!r} is not one of {', '.join(CHOICES)} (or null to follow the weights)"
        )


def resolve_normalization(
    requested: str | None, weights: dict[str, Any] | None, dataset_stats: Callable[[], Stats]
) -> Normalization:
    """Explicit setting, then the weights' metadata, then the dataset's statistics.

    `weights` describes the loaded backbone weights: None for random init, else
    `{"source": ..., "mean": ..., "std": ..., "name": ...}` where mean/std are absent when the
    weights do not say what they were trained with.
    """
    check_choice(requested)
    from_weights = _weights_stats(weights)
    if requested is not None:
        chosen = _named(str(requested), dataset_stats)
        if from_weights is not None and not _same(chosen, from_weights):
            warnings.warn(
                f"data.normalization={requested} but the backbone weights ({weights.get('source')}) were trained with "
                f"mean={list(from_weights.mean)} std={list(from_weights.std)}; leave data.normalization unset to follow them",
                stacklevel=2,
            )
        return chosen
    if from_weights is not None:
        return from_weights
    mean, std = dataset_stats()
    if weights is None:
        return Normalization("dataset", tuple(mean), tuple(std), "the dataset's statistics (random init)")
    log.warning(
        "the backbone weights (%s) do not say how their images were normalized; using the dataset's statistics. "
        "Set data.normalization=imagenet if they were trained on ImageNet with the usual mean/std",
        weights.get("source"),
    )
    return Normalization(
        "dataset", tuple(mean), tuple(std), f"the dataset's statistics ({weights.get('source')} does not say)"
    )


def _named(name: str, dataset_stats: Callable[[], Stats]) -> Normalization:
    if name == "imagenet":
        return Normalization("imagenet", IMAGENET_MEAN, IMAGENET_STD, "data.normalization=imagenet")
    if name == "none":
        return Normalization("none", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "data.normalization=none")
    mean, std = dataset_stats()
    return Normalization(
        name, tuple(mean), tuple(std), f"data.normalization={name}: the dataset's statistics"
    )


def _weights_stats(weights: dict[str, Any] | None) -> Normalization | None:
    if not weights or weights.get("mean") is None or weights.get("std") is None:
        return None
    mean, std = tuple(float(v) for v in weights["mean"]), tuple(float(v) for v in weights["std"])
    name = weights.get("name") or ("imagenet" if (mean, std) == (IMAGENET_MEAN, IMAGENET_STD) else "weights")
    return Normalization(str(name), mean, std, f"the weights' own ({weights.get('source')})")


def _same(a: Normalization, b: Normalization, tol: float = 1e-3) -> bool:
    pairs = list(zip(a.mean + a.std, b.mean + b.std))
    return len(a.mean) == len(b.mean) and all(abs(x - y) <= tol for x, y in pairs)


def describe_weights(backbone) -> dict[str, Any] | None:
    """What `resolve_normalization` needs to know of a backbone's weights; None for random init."""
    source = getattr(backbone, "weights_source", "random init")
    if source == "random init":
        return None
    return {"source": source, **(getattr(backbone, "normalization", None) or {})}
