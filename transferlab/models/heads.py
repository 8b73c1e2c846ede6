"""Classification heads put on top of a backbone's flat features."""

from __future__ import annotations

import numbers

from torch import nn


def linear_head(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    _check_sizes(in_features=in_features, num_classes=num_classes)
    _check_dropout(dropout)
    layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


def mlp_head(
    in_features: int,
    num_classes: int,
    hidden: int = 256,
    dropout: float = 0.0,
    batchnorm: bool = True,
) -> nn.Module:
    """Linear -> BatchNorm1d -> ReLU (-> Dropout) -> Linear, the head of the VGG study.

    `batchnorm=false` gives the plain Linear-ReLU-Linear head of the CIFAR-100 studies.
    """
    _check_sizes(in_features=in_features, num_classes=num_classes, hidden=hidden)
    _check_dropout(dropout)
    layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.ReLU(inplace=True))
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


# ValueError, not UserError: the head does not know its config key; the caller that built it
# from `head.*` reports it as `head: <message>` (transferlab.utils.errors.bad_argument).
def _check_sizes(**sizes: int) -> None:
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"{name}={size!r} must be a positive integer")


def _check_dropout(dropout: float) -> None:
    # 1.0 would zero every feature: the head would learn from nothing.
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r} must be a number in [0, 1)")
