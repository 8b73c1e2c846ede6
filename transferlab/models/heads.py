"""Classification heads put on top of a backbone's flat features."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
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


# ---- heads that are the training set's features (mode=knn, mode=ncm: methods/neighbors.py) -------
#: the smallest probability a kNN head gives a class, so that the test NLL stays finite
KNN_PROBABILITY_FLOOR = 1e-6


class KnnHead(nn.Module):
    """k-nearest-neighbour classifier on L2-normalized features, DINOv2's protocol (Oquab et al.
    2023, after Wu et al. 2018): cosine similarity to every stored training feature, the k most
    similar vote with weight exp(similarity / temperature), and the class probabilities are the
    normalized votes, floored at KNN_PROBABILITY_FLOOR and renormalized (a class without a vote
    would otherwise have probability 0 and an infinite NLL). Returns their logarithms as logits:
    softmax of them gives the probabilities back, so the losses, predict and export are a
    linear head's. Ties in similarity go to the training image stored first (a stable sort).
    """

    def __init__(self, in_features: int, num_classes: int, memory_size: int, k: int, temperature: float):
        super().__init__()
        _check_sizes(in_features=in_features, num_classes=num_classes, memory_size=memory_size, k=k)
        if k > memory_size:
            raise ValueError(f"k={k} is more than the {memory_size} stored training images")
        self.num_classes, self.k, self.temperature = int(num_classes), int(k), float(temperature)
        self.register_buffer("memory", torch.zeros(memory_size, in_features))
        self.register_buffer("memory_labels", torch.zeros(memory_size, dtype=torch.long))

    def store(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.memory.copy_(F.normalize(features.float(), dim=1))
        self.memory_labels.copy_(labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        similarity = F.normalize(x.float(), dim=1) @ self.memory.T
        return votes_as_logits(similarity, self.memory_labels, self.k, self.temperature, self.num_classes)


def votes_as_logits(
    similarity: torch.Tensor, labels: torch.Tensor, k: int, temperature: float, num_classes: int
) -> torch.Tensor:
    """log of the floored, renormalized temperature-weighted votes of the k most similar (B, C)."""
    if torch.onnx.is_in_onnx_export():
        # ONNX has no stable sort; its TopK breaks ties by the lower index too (the ONNX operator spec)
        top, index = torch.topk(similarity, k, dim=1, largest=True, sorted=True)
    else:
        top, index = torch.sort(similarity, dim=1, descending=True, stable=True)
        top, index = top[:, :k], index[:, :k]
    # shifted by each row's largest similarity (a constant factor of its votes): the nearest weighs 1,
    # so no temperature overflows or leaves every vote 0
    weights = torch.exp((top - top[:, :1]) / temperature)
    votes = torch.zeros(similarity.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    votes = votes.scatter_add(1, labels[index], weights)
    probabilities = votes / votes.sum(dim=1, keepdim=True)
    probabilities = probabilities.clamp_min(KNN_PROBABILITY_FLOOR)
    return (probabilities / probabilities.sum(dim=1, keepdim=True)).log()


class NcmHead(nn.Module):
    """Nearest class mean on L2-normalized features: cosine similarity to each class's mean of the
    normalized training features (itself normalized), as logits divided by `temperature` (the
    softmax of them are the probabilities). A class without training images has a zero mean: its
    logit is 0 for every image."""

    def __init__(self, in_features: int, num_classes: int, temperature: float):
        super().__init__()
        _check_sizes(in_features=in_features, num_classes=num_classes)
        self.temperature = float(temperature)
        self.register_buffer("means", torch.zeros(num_classes, in_features))

    def store(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        normalized = F.normalize(features.float(), dim=1)
        sums = torch.zeros_like(self.means).index_add(0, labels, normalized)
        self.means.copy_(F.normalize(sums, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1) @ self.means.T / self.temperature


def knn_head(in_features: int, num_classes: int, memory_size: int, k: int, temperature: float) -> nn.Module:
    return KnnHead(in_features, num_classes, memory_size, k, temperature)


def ncm_head(in_features: int, num_classes: int, temperature: float) -> nn.Module:
    return NcmHead(in_features, num_classes, temperature)
