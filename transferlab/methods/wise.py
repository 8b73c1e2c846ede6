"""WiSE-FT (Wortsman et al. 2022): the weights of a probe and of a network fine-tuned from the same
pretrained start, mixed in weight space, `(1 - alpha) * start + alpha * finetuned`.

`interpolated` mixes two state dicts of one network; `recompute_batchnorm` re-estimates the
BatchNorm running statistics of the mixed network on training images, in the layers where the two
runs' statistics differ (`differing_batchnorms`: their mix is the statistics of neither network);
`evaluate` measures accuracy and loss on a split; `choose` picks the alpha on validation. `python -m transferlab.interpolate` runs them for each alpha.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferlab.data.datamodule import TensorDataset
from transferlab.data.subsets import Split

#: how the alpha is chosen, in words (interpolate.md, run_info.json)
RULE = "the highest val/acc; among equal ones the lowest val/loss, then the smallest alpha"


# ---- the weights -------------------------------------------------------------------------------
def interpolated(
    start: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """`(1 - alpha) * start + alpha * finetuned` for every floating-point tensor (exactly `start` at
    alpha 0 and `finetuned` at 1); other tensors (BatchNorm's integer `num_batches_tracked`) are the
    fine-tuned network's. Both state dicts must hold the same keys and shapes."""
    if set(start) != set(finetuned):
        only = sorted(set(start) ^ set(finetuned))
        raise ValueError(f"the state dicts hold different tensors (e.g. {only[0]})")
    mixed = {}
    for key, tuned in finetuned.items():
        if tuned.is_floating_point():
            mixed[key] = (1.0 - alpha) * start[key].to(tuned.dtype) + alpha * tuned
        else:
            mixed[key] = tuned.clone()
    return mixed


def batchnorms(network: nn.Module) -> dict[str, _BatchNorm]:
    """The BatchNorm layers that keep running statistics, by their names in the network."""
    return {
        name: module
        for name, module in network.named_modules()
        if isinstance(module, _BatchNorm) and module.track_running_stats
    }


def differing_batchnorms(
    network: nn.Module, start: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]
) -> list[_BatchNorm]:
    """The BatchNorm layers whose running statistics differ between the two state dicts (of
    `network`'s keys). Where both runs hold the same ones (a BatchNorm neither run updated: LP-FT's
    backbone with train_bn=false, frozen stages), their mix is those statistics, the ones both
    networks trained with: nothing to re-estimate."""
    stale = []
    for name, layer in batchnorms(network).items():
        keys = [f"{name}.running_mean", f"{name}.running_var"]
        if any(not torch.equal(start[key], finetuned[key]) for key in keys):
            stale.append(layer)
    return stale


@torch.no_grad()
def recompute_batchnorm(
    network: nn.Module,
    images: Iterable[Tensor],
    prepare: Callable[[Tensor], Tensor],
    layers: Sequence[_BatchNorm] | None = None,
) -> int:
    """Re-estimate the running mean and variance of `layers` (default: every BatchNorm that keeps
    them) from `images` (uint8 batches, made network input by `prepare`): their statistics reset,
    then a cumulative average over the batches (momentum None), only these layers in train mode
    (the other BatchNorm layers, dropout and the rest in eval), no gradient. Returns the number of
    images seen; the network's modes and the layers' momenta are restored."""
    layers = list(batchnorms(network).values()) if layers is None else list(layers)
    if not layers:
        return 0
    was_training = network.training
    momenta = [layer.momentum for layer in layers]
    network.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    device = next(network.parameters()).device
    seen = 0
    try:
        for batch in images:
            network(prepare(batch.to(device)))
            seen += len(batch)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        network.train(was_training)
    return seen


# ---- measuring ---------------------------------------------------------------------------------
@dataclass
class Scores:
    """A network's results on one split."""

    correct: int
    images: int
    loss: float  # mean cross-entropy per image
    logits: Tensor  # (images, classes), float32 on the CPU
    labels: Tensor

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else float("nan")


@torch.inference_mode()
def evaluate(
    network: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], prepare: Callable[[Tensor], Tensor]
) -> Scores:
    """Accuracy and mean cross-entropy of `network` (in eval mode) on (uint8 images, labels) batches."""
    was_training = network.training
    network.eval()
    device = next(network.parameters()).device
    all_logits, all_labels = [], []
    try:
        for images, labels in batches:
            all_logits.append(network(prepare(images.to(device))).float().cpu())
            all_labels.append(labels.cpu())
    finally:
        network.train(was_training)
    if not all_logits:
        return Scores(0, 0, float("nan"), torch.empty(0, 0), torch.empty(0, dtype=torch.long))
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    loss = float(F.cross_entropy(logits.double(), labels, reduction="sum")) / len(labels)
    return Scores(int((logits.argmax(dim=1) == labels).sum()), len(labels), loss, logits, labels)


def batches(split: Split, batch_size: int, drop_single: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """(uint8 images, labels) of `split` in its order (no shuffling, no augmentation), `batch_size` at
    a time. `drop_single`: a last batch of one image is left out (BatchNorm in train mode cannot
    take it, as the data module's training loader drops it)."""
    dataset = TensorDataset(split)
    for first in range(0, len(dataset), batch_size):
        indices = list(range(first, min(first + batch_size, len(dataset))))
        if drop_single and len(indices) == 1 and first > 0:
            return
        yield dataset.__getitems__(indices)


# ---- the choice --------------------------------------------------------------------------------
@dataclass
class AlphaResult:
    """One alpha's results: validation, test and, when asked, the corrupted test (the tests never take
    part in the choice)."""

    alpha: float
    val: Scores
    test: Scores
    test_c: dict[str, float] = field(default_factory=dict)  # run.robustness's test_c/* metrics

    def row(self) -> dict[str, float]:
        """What the tables show, by metric name (as metrics.json names them)."""
        return {
            "alpha": self.alpha,
            "val/acc": self.val.accuracy,
            "val/loss": self.val.loss,
            "test/acc": self.test.accuracy,
            "test/loss": self.test.loss,
            **({"test_c/acc": self.test_c["test_c/acc"]} if self.test_c else {}),
        }


def rank_key(result: AlphaResult) -> tuple:
    """Smaller is better (RULE): most correct validation images, then the lowest validation loss, then
    the smallest alpha. The test takes no part."""
    return (-result.val.correct, result.val.loss, result.alpha)


def choose(results: Sequence[AlphaResult]) -> AlphaResult:
    """The alpha chosen on validation (RULE)."""
    return min(results, key=rank_key)
