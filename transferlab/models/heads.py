"""Classification heads put on top of a backbone's flat features."""

from __future__ import annotations

from torch import nn


def linear_head(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
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
    layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.ReLU(inplace=True))
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)
