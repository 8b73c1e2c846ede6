"""Backbones: networks cut at their feature-extraction point, returning flat features.

Every backbone is a `Backbone`: `body` (the network up to its features), an optional
global `pool`, and a flatten. It knows its feature size at the run's image size
(`out_features`, so the head can be built for it) and its natural `stages` (VGG conv
blocks, ResNet stem/layer1..4), which partial freezing and layer-wise learning-rate
decay count in.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from typing import Sequence

import torch
import torchvision.models as tvm
from torch import nn

from transferlab.models import weights as W
from transferlab.utils.errors import UserError

log = logging.getLogger(__name__)

#: attribute names torchvision classification models keep their classifier under
CLASSIFIER_ATTRS = ("fc", "classifier", "head", "heads")
#: layers that compute class scores; a classifier is cut at the first of them
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
#: torchvision models that grow auxiliary classifiers in training mode (their keys in the weights)
AUX_CLASSIFIERS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}


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
        self.out_features = self._feature_size(image_size)
        self.weights_source = "random init"
        self.normalization: dict | None = None  # of the loaded weights, when known

    @property
    def stages(self) -> list[list[nn.Module]]:
        """The backbone's natural blocks, input side first."""
        return self._stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.body(x)))

    def _feature_size(self, image_size: int) -> int:
        return probe_features(self, image_size, self.name, "use a larger data.image_size (32 or 224)")

    # ---- weights -------------------------------------------------------------------------
    def load_weights(
        self, loaded: W.LoadedWeights, torchvision_prefix: str = "", unused: Sequence[str] = ()
    ) -> None:
        """Load a state dict in transferlab form (`body.*`) or in the torchvision model's own form.

        Keys are compared in the torchvision model's names: `torchvision_prefix` is where
        `body` sits in that model (`features.` for VGG), and keys under an `unused` prefix
        belong to parts this backbone leaves out (the classifier, cut layers) and are skipped.
        Any other key that does not fit is an architecture mismatch.
        """
        state = _to_model_names(loaded.state_dict, torchvision_prefix)
        skipped = [k for k in state if k.startswith(tuple(unused))]
        if skipped:
            parts = ", ".join(sorted({k.split(".")[0] for k in skipped}))
            log.info(
                "%s: %d tensors of %s belong to parts it leaves out (%s); not used",
                self.name,
                len(skipped),
                loaded.source,
                parts,
            )
        body_state = {
            ("body." + k[len(torchvision_prefix) :] if k.startswith(torchvision_prefix) else k): v
            for k, v in state.items()
            if not k.startswith(tuple(unused))
        }
        W.load_into(self, body_state, loaded.source)
        self.weights_source = loaded.source
        self.normalization = loaded.normalization


def _to_model_names(state: dict[str, torch.Tensor], torchvision_prefix: str) -> dict[str, torch.Tensor]:
    """transferlab keys (`body.x`) -> the torchvision model's keys (`<prefix>x`); others as they are."""
    if state and all(k.startswith(("body.", "pool.")) for k in state):
        return {torchvision_prefix + k[len("body.") :]: v for k, v in state.items()}
    return dict(state)


def probe_features(module: nn.Module, image_size: int, what: str, fix: str) -> int:
    """Feature size of `module` for one image of `image_size`; too small an image is a user error."""
    was_training = module.training
    module.eval()  # a dummy batch in train mode would move BatchNorm running statistics
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
        if isinstance(e, torch.OutOfMemoryError) or "allocate" in reason or "out of memory" in reason.lower():
            raise UserError(
                f"data.image_size={image_size} is too large for {what}: one image does not fit in memory ({reason}); "
                "use a smaller data.image_size"
            ) from None
        raise UserError(f"data.image_size={image_size} is too small for {what} ({reason}); {fix}") from None
    finally:
        module.train(was_training)
    return int(out.flatten(1).shape[1])


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
    model = _torchvision_model(name, weights)
    if cifar_stem:
        _cifar_stem(model, name)

    if name.startswith("vgg"):
        body, prefix, unused = model.features, "features.", ("avgpool.", "classifier.")
        stages = _split_after(list(model.features), nn.MaxPool2d)
    else:
        if pool not in (None, "none", "null"):
            raise UserError(
                f"backbone.pool={pool} applies to VGG backbones, whose features are not pooled; "
                f"{name} keeps its own global pool, leave backbone.pool=null"
            )
        attr, removed = _cut_classifier(model, name)
        body, prefix = model, ""
        unused = (*removed, *(f"{aux}." for aux in AUX_CLASSIFIERS.get(name, ())))
        stages = _natural_stages(model, attr)

    backbone = Backbone(body, stages, image_size=image_size, pool=pool, name=name)
    if W.wants_weights(weights):
        loaded = (
            W.load_weights_file(weights) if W.is_path(weights) else W.load_torchvision_weights(name, weights)
        )
        if cifar_stem:
            loaded = _keep_fresh_stem(loaded, model.conv1, prefix)
        backbone.load_weights(loaded, torchvision_prefix=prefix, unused=unused)
    return backbone


def _torchvision_model(name: str, weights) -> nn.Module:
    if name not in tvm.list_models(module=tvm):
        raise UserError(
            f"backbone.name={name!r} is not a torchvision classification model; "
            f"see torchvision.models.list_models() (e.g. resnet18, vgg11_bn, efficientnet_b0)"
        )
    options = {}
    if name in AUX_CLASSIFIERS:
        # Auxiliary classifiers change the training-mode output to a tuple; a backbone has none.
        # Their ImageNet weights expect torchvision's own input transform.
        options = {"aux_logits": False, "init_weights": True, "transform_input": W.wants_weights(weights)}
    return tvm.get_model(name, weights=None, **options)


def _cut_classifier(model: nn.Module, name: str) -> tuple[str, list[str]]:
    """Remove the classifier from its first Linear/Conv on; return its attribute and removed key prefixes.

    What precedes that layer (ConvNeXt's LayerNorm, MaxViT's pool + norm) still describes
    features and stays; so does a global pool after it (SqueezeNet), so features are
    pooled wherever the model pools. Dropout goes: the head has its own.
    """
    attr = next((a for a in CLASSIFIER_ATTRS if isinstance(getattr(model, a, None), nn.Module)), None)
    if attr is None:
        raise UserError(
            f"cannot find the classifier of torchvision model {name!r} (looked for {CLASSIFIER_ATTRS})"
        )
    classifier = getattr(model, attr)
    layers = (
        list(classifier.named_children()) if isinstance(classifier, nn.Sequential) else [("", classifier)]
    )
    kept, removed, past_features = [], [], False
    for child, layer in layers:
        past_features = past_features or isinstance(layer, WEIGHT_LAYERS)
        keep = isinstance(layer, GLOBAL_POOLS) if past_features else not isinstance(layer, nn.Dropout)
        if keep:
            kept.append((child, layer))
        elif any(True for _ in layer.parameters()):
            removed.append(f"{attr}.{child}." if child else f"{attr}.")
    # Children keep their names, so the kept layers load from the model's own weights keys.
    setattr(model, attr, nn.Sequential(OrderedDict(kept)) if kept else nn.Identity())
    return attr, removed


def _cifar_stem(model: nn.Module, name: str) -> None:
    """3x3 stride-1 first conv and no max pool: ResNets that keep 32 px detail."""
    if not hasattr(model, "conv1") or not hasattr(model, "maxpool"):
        raise UserError(f"backbone.cifar_stem=true applies to ResNets only, not {name}")
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _keep_fresh_stem(loaded: W.LoadedWeights, conv1: nn.Conv2d, prefix: str = "") -> W.LoadedWeights:
    """ImageNet's 7x7 first conv cannot fill the CIFAR stem's 3x3 one: keep its fresh init.

    A checkpoint of an earlier cifar_stem run has a 3x3 conv1 and loads it as is.
    """
    state = dict(loaded.state_dict)
    for key in (f"{prefix}conv1.weight", "body.conv1.weight"):
        if key in state and state[key].shape != conv1.weight.shape:
            warnings.warn(
                f"backbone.cifar_stem=true: the first conv is re-initialized, not taken from {loaded.source} "
                f"(its conv1 is {tuple(state[key].shape)}, the CIFAR stem's is {tuple(conv1.weight.shape)})",
                stacklevel=3,
            )
            state[key] = conv1.weight.detach().clone()
    return W.LoadedWeights(state, loaded.source, loaded.normalization)


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
    children = (
        list(features)
        if isinstance(features, nn.Sequential)
        else [m for n, m in model.named_children() if n != classifier_attr]
    )
    # Activations and pools hold nothing to freeze; counting them would make stage numbers meaningless.
    return [[m] for m in children if any(True for _ in m.parameters())]


# ---- ResNet cut after layer2 ---------------------------------------------------------------
def truncated_resnet(
    name: str = "resnet50",
    weights: str | None = "imagenet",
    image_size: int = 32,
    drop_layer2_blocks: Sequence[int] = (),
    cifar_stem: bool = False,
) -> Backbone:
    """A ResNet's stem, layer1 and layer2 (minus `drop_layer2_blocks`), then global average pool.

    Weights come from the full network (ImageNet, or a transferlab checkpoint of a full
    ResNet run): keys of layer3, layer4, fc and the dropped blocks are expected and skipped.
    """
    model = _torchvision_model(name, weights)
    if not all(hasattr(model, a) for a in ("conv1", "bn1", "layer1", "layer2", "maxpool")):
        raise UserError(f"backbone=truncated_resnet needs a ResNet (resnet18, resnet50, ...), not {name}")
    if cifar_stem:
        _cifar_stem(model, name)
    dropped = _check_dropped_blocks(drop_layer2_blocks, len(model.layer2), name)
    # Blocks keep their original index as name, so `layer2.3.*` keys of the full network still fit.
    layer2 = nn.Sequential(
        OrderedDict((str(i), block) for i, block in enumerate(model.layer2) if i not in dropped)
    )
    body = nn.Sequential(
        OrderedDict(
            conv1=model.conv1,
            bn1=model.bn1,
            relu=model.relu,
            maxpool=model.maxpool,
            layer1=model.layer1,
            layer2=layer2,
        )
    )
    stages = [[model.conv1, model.bn1], [model.layer1], [layer2]]
    suffix = f"-drop{'_'.join(map(str, dropped))}" if dropped else ""
    backbone = Backbone(body, stages, image_size=image_size, pool="avg", name=f"{name}_layer2{suffix}")
    if W.wants_weights(weights):
        loaded = (
            W.load_weights_file(weights) if W.is_path(weights) else W.load_torchvision_weights(name, weights)
        )
        if cifar_stem:
            loaded = _keep_fresh_stem(loaded, model.conv1)
        unused = ("layer3.", "layer4.", "fc.", *(f"layer2.{i}." for i in dropped))
        backbone.load_weights(loaded, unused=unused)
    return backbone


def _check_dropped_blocks(blocks: Sequence[int] | None, count: int, name: str) -> list[int]:
    dropped = sorted({int(b) for b in blocks or ()})
    # Block 0 halves the resolution and widens the channels; only later (identity-shaped) blocks can go.
    bad = [b for b in dropped if not 1 <= b < count]
    if bad:
        raise UserError(
            f"backbone.drop_layer2_blocks={list(dropped)}: {name}'s layer2 has blocks 0..{count - 1}, "
            f"and only blocks 1..{count - 1} can be dropped (block 0 changes the shape)"
        )
    return dropped


# ---- VGG-style network built from config ----------------------------------------------------
CONV_LAYERS = ("conv", "bn", "maxpool", "dropout")
DENSE_LAYERS = ("dense", "bn", "dropout")
#: the block variants of the VGG-blocks study; any other layer list works too
CONV_BLOCKS = (
    "conv-bn-conv-maxpool-dropout",
    "bn-conv-bn-conv-maxpool-dropout",
    "conv-bn-conv-bn-maxpool",
    "conv-dropout-conv-dropout-maxpool",
)
DENSE_BLOCKS = ("dense-dropout", "dense-bn", "dense-bn-dropout")


def vgg_blocks(
    image_size: int = 32,
    channels: Sequence[int] = (32, 64, 128),
    conv_block: str | Sequence[str] = "conv-bn-conv-maxpool-dropout",
    dense_sizes: Sequence[int] = (128,),
    dense_block: str | Sequence[str] = "dense-dropout",
    dropout: float = 0.2,
    weights: str | None = "none",
) -> Backbone:
    """VGG-style blocks: one conv block per entry of `channels`, then one dense block per `dense_sizes`.

    A block is a list of layer names (or those names joined by "-"): conv (3x3, padding 1,
    then ReLU), bn, maxpool (2x2), dropout for conv blocks; dense (then ReLU), bn, dropout
    for dense blocks. The dense blocks belong to the backbone; the head comes after them.
    """
    conv_layers = _block_layers(conv_block, CONV_LAYERS, CONV_BLOCKS, "conv_block", required="conv")
    dense_layers = _block_layers(dense_block, DENSE_LAYERS, DENSE_BLOCKS, "dense_block", required="dense")
    if not 0 <= float(dropout) < 1:
        raise UserError(f"backbone.dropout={dropout} must be in [0, 1)")

    named: list[tuple[str, nn.Module]] = []
    in_ch = 3
    for i, out_ch in enumerate(channels, start=1):
        block, in_ch = _conv_block(conv_layers, in_ch, int(out_ch), dropout)
        named.append((f"conv{i}", block))
    named.append(("flatten", nn.Flatten(1)))
    in_features = _flat_size(nn.Sequential(OrderedDict(named)), image_size)
    for i, size in enumerate(dense_sizes, start=1):
        block, in_features = _dense_block(dense_layers, in_features, int(size), dropout)
        named.append((f"dense{i}", block))

    body = nn.Sequential(OrderedDict(named))
    stages = [[m] for n, m in named if n != "flatten"]
    backbone = Backbone(body, stages, image_size=image_size, name="vgg_blocks")
    _load_file_weights(backbone, weights)
    return backbone


def _block_layers(spec, allowed: tuple, variants: tuple, option: str, required: str) -> list[str]:
    layers = spec.split("-") if isinstance(spec, str) else [str(x) for x in spec]
    unknown = [x for x in layers if x not in allowed]
    if unknown or required not in layers:
        raise UserError(
            f"backbone.{option}={spec!r}: a block is a list of {', '.join(allowed)} with at least one {required}, "
            f"or those names joined by '-' ({', '.join(variants)})"
            + (f"; unknown {unknown}" if unknown else "")
        )
    return layers


def _conv_block(layers: list[str], in_ch: int, out_ch: int, dropout: float) -> tuple[nn.Sequential, int]:
    modules: list[nn.Module] = []
    for layer in layers:
        if layer == "conv":
            modules += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = out_ch
        elif layer == "bn":
            modules.append(nn.BatchNorm2d(in_ch))
        elif layer == "maxpool":
            modules.append(nn.MaxPool2d(2))
        else:
            modules.append(nn.Dropout(dropout))
    return nn.Sequential(*modules), in_ch


def _dense_block(layers: list[str], in_features: int, size: int, dropout: float) -> tuple[nn.Sequential, int]:
    modules: list[nn.Module] = []
    for layer in layers:
        if layer == "dense":
            modules += [nn.Linear(in_features, size), nn.ReLU(inplace=True)]
            in_features = size
        elif layer == "bn":
            modules.append(nn.BatchNorm1d(in_features))
        else:
            modules.append(nn.Dropout(dropout))
    return nn.Sequential(*modules), in_features


def _flat_size(convs: nn.Module, image_size: int) -> int:
    return probe_features(
        convs,
        image_size,
        "these vgg_blocks (each maxpool halves it)",
        "use fewer blocks or a larger data.image_size",
    )


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
