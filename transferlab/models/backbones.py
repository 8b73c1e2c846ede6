"""Backbones: networks cut at their feature-extraction point, returning flat features.

Every backbone is a `Backbone`: `body` (the network up to its features), an optional
global `pool`, and a flatten. It knows its feature size at the run's image size
(`out_features`, so the head can be built for it) and its natural `stages` (VGG conv
blocks, ResNet stem/layer1..4), which partial freezing counts in.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch
from torch import nn

from transferlab.errors import UserError
from transferlab.models import weights as W

log = logging.getLogger(__name__)

#: attribute names torchvision classification models keep their classifier under
CLASSIFIER_ATTRS = ("fc", "classifier", "head", "heads")


class Backbone(nn.Module):
    def __init__(
        self,
        body: nn.Module,
        stages: Sequence[Sequence[nn.Module]],
        image_size: int,
        pool: str | None = None,
        name: str = "backbone",
    ):
        super().__init__()
        self.body = body
        self.pool = _make_pool(pool)
        self.flatten = nn.Flatten(1)
        self.name = name
        # A plain list (not registered): the same modules are already children of `body`.
        self._stages = [list(stage) for stage in stages]
        self.image_size = image_size
        self.out_features = self._feature_size(image_size)
        self.weights_source = "random init"
        self.normalization: dict | None = None  # of the loaded weights, when known

    @property
    def stages(self) -> list[list[nn.Module]]:
        return self._stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.body(x)))

    def _feature_size(self, image_size: int) -> int:
        was_training = self.training
        self.eval()  # a dummy batch in train mode would move BatchNorm running statistics
        try:
            with torch.no_grad():
                out = self(torch.zeros(1, 3, image_size, image_size))
        except RuntimeError as e:
            raise UserError(
                f"data.image_size={image_size} is too small for {self.name} "
                f"({str(e).splitlines()[0]}); use a larger data.image_size (32 or 224)"
            ) from None
        finally:
            self.train(was_training)
        return int(out.shape[1])

    # ---- weights -------------------------------------------------------------------------
    def load_weights(self, loaded: W.LoadedWeights, torchvision_prefix: str = "", dropped: Sequence[str] = ()) -> None:
        """Load a backbone state dict in transferlab form (`body.*`) or torchvision's own form."""
        state = loaded.state_dict
        if not all(k.startswith(("body.", "pool.")) for k in state):
            state = {
                "body." + k[len(torchvision_prefix) :]: v
                for k, v in state.items()
                if k.startswith(torchvision_prefix) and not k.startswith(tuple(dropped))
            }
        W.load_into(self, state, loaded.source)
        self.weights_source = loaded.source
        self.normalization = loaded.normalization


def _make_pool(pool: str | None) -> nn.Module:
    if pool in (None, "none", "null"):
        return nn.Identity()
    if pool == "avg":
        return nn.AdaptiveAvgPool2d(1)
    if pool == "max":
        return nn.AdaptiveMaxPool2d(1)
    raise UserError(f"backbone.pool={pool!r} is not one of none, avg, max")


# ---- torchvision models ------------------------------------------------------------------
def torchvision_backbone(
    name: str,
    weights: str | None = "imagenet",
    image_size: int = 32,
    pool: str | None = None,
    cifar_stem: bool = False,
) -> Backbone:
    """Any torchvision classification model by name, cut before its classifier.

    VGGs keep `features` only (no avgpool/classifier), as in the VGG studies; other
    models keep everything up to and including their global pool.
    """
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        raise UserError(
            f"backbone.name={name!r} is not a torchvision classification model; "
            f"see torchvision.models.list_models() (e.g. resnet18, vgg11_bn, efficientnet_b0)"
        )
    model = tvm.get_model(name, weights=None)
    if cifar_stem:
        _cifar_stem(model, name, weights)

    if name.startswith("vgg"):
        body, prefix, dropped = model.features, "features.", ()
        stages = _split_after(list(model.features), nn.MaxPool2d)
    else:
        attr = next((a for a in CLASSIFIER_ATTRS if isinstance(getattr(model, a, None), nn.Module)), None)
        if attr is None:
            raise UserError(f"cannot find the classifier of torchvision model {name!r} (looked for {CLASSIFIER_ATTRS})")
        setattr(model, attr, nn.Identity())
        body, prefix, dropped = model, "", (f"{attr}.",)
        stages = _natural_stages(model, attr)

    backbone = Backbone(body, stages, image_size=image_size, pool=pool, name=name)
    if W.wants_weights(weights):
        loaded = W.load_weights_file(weights) if W.is_path(weights) else W.load_torchvision_weights(name, weights)
        if cifar_stem:  # the pretrained 7x7 stem does not fit the 3x3 one: keep the fresh init
            for key in ("conv1.weight", "body.conv1.weight"):
                if key in loaded.state_dict:
                    loaded.state_dict[key] = model.conv1.weight.detach().clone()
        backbone.load_weights(loaded, torchvision_prefix=prefix, dropped=dropped)
    return backbone


def _cifar_stem(model: nn.Module, name: str, weights) -> None:
    """3x3 stride-1 first conv and no max pool: ResNets that keep 32 px detail."""
    if not hasattr(model, "conv1") or not hasattr(model, "maxpool"):
        raise UserError(f"backbone.cifar_stem=true applies to ResNets only, not {name}")
    if W.wants_weights(weights):
        warnings.warn(
            "backbone.cifar_stem=true replaces the first conv: it is re-initialized, "
            "not taken from the pretrained weights",
            stacklevel=2,
        )
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _split_after(layers: list[nn.Module], boundary: type) -> list[list[nn.Module]]:
    """Group consecutive layers into blocks that each end with a `boundary` layer."""
    stages, current = [], []
    for layer in layers:
        current.append(layer)
        if isinstance(layer, boundary):
            stages.append(current)
            current = []
    if current:
        stages.append(current)
    return stages


def _natural_stages(model: nn.Module, classifier_attr: str) -> list[list[nn.Module]]:
    if all(hasattr(model, a) for a in ("conv1", "bn1", "layer1", "layer4")):  # ResNet family
        return [[model.conv1, model.bn1]] + [[getattr(model, f"layer{i}")] for i in range(1, 5)]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return [[m] for m in features]
    return [[m] for n, m in model.named_children() if n != classifier_attr and any(True for _ in m.parameters())]


# ---- the custom CNN of the CIFAR-100 study ------------------------------------------------
def cnn_small(
    image_size: int = 32,
    channels: Sequence[int] = (16, 32, 64, 128, 512),
    weights: str | None = "none",
) -> Backbone:
    """Five blocks of Conv3x3(pad 1) -> ReLU -> BatchNorm -> MaxPool2, then Flatten.

    With `head=mlp head.hidden=256 head.batchnorm=false` this is exactly the study's
    network: 846,308 parameters for 100 classes.
    """
    blocks, in_ch = [], 3
    for out_ch in channels:
        blocks.append(
            nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.BatchNorm2d(out_ch),
                nn.MaxPool2d(2),
            )
        )
        in_ch = out_ch
    body = nn.Sequential(*blocks)
    backbone = Backbone(body, [[b] for b in blocks], image_size=image_size, name="cnn_small")
    _load_file_weights(backbone, weights)
    return backbone


def _load_file_weights(backbone: Backbone, weights) -> None:
    """Custom backbones have no ImageNet weights; a file from an earlier run still loads."""
    if not W.wants_weights(weights):
        return
    if not W.is_path(weights):
        raise UserError(
            f"backbone.weights={weights!r}: {backbone.name} has no pretrained weights; use none or a checkpoint path"
        )
    backbone.load_weights(W.load_weights_file(weights))
