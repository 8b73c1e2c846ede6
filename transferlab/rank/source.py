"""The source model's classifier for LEEP and NCE, where the backbone's pretraining has one we can read.

LEEP and NCE need the source model's class probabilities on the target images. Backbones are
built without their classifier; for EfficientNet-Lite the ImageNet classifier is in the package
weights, and applied to the backbone's pooled features it gives timm's full model's logits.
Anything else has no head here, with the reason in words: never a made-up number.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig
from torch import nn

from transferlab.models import weights as W
from transferlab.models.timm_backbones import efficientnet_lite_classifier

LITE_TARGET = "transferlab.models.efficientnet_lite"
IMAGENET = ("imagenet", "default", "true")


@dataclass
class SourceHead:
    """`head` maps the backbone's features to the source model's logits; None with `reason` when unknown."""

    head: nn.Module | None
    reason: str = ""


def source_head(backbone_cfg: DictConfig, backbone: nn.Module) -> SourceHead:
    """The source classifier that belongs to this backbone's weights, or why there is none."""
    weights = backbone_cfg.get("weights")
    if not W.wants_weights(weights):
        return SourceHead(None, "random init: no source model to predict with")
    if backbone_cfg.get("_target_") != LITE_TARGET or str(weights).lower() not in IMAGENET:
        return SourceHead(
            None,
            f"no source classifier for {getattr(backbone, 'name', 'this backbone')} ({backbone.weights_source}): "
            "only EfficientNet-Lite's ImageNet head is read",
        )
    head = efficientnet_lite_classifier(str(backbone_cfg.get("variant", "lite0")))
    if head.in_features != backbone.out_features:  # a pool or cut that changed the features
        return SourceHead(
            None,
            f"the ImageNet head takes {head.in_features} features, the backbone gives {backbone.out_features}",
        )
    return SourceHead(head)
