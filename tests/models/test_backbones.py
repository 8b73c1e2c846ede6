"""Backbones: where each is cut, its stages, its parameter count, and how its weights load."""

from __future__ import annotations

import warnings
from pathlib import Path

import hydra
import pytest
import torch
from conftest import REPO, compose_config
from fakedata import write_torchvision_weights
from torch import nn

from transferlab.models import TransferModule, torchvision_backbone, truncated_resnet, vgg_blocks
from transferlab.utils.errors import UserError

BACKBONE_CONFIGS = sorted(p.stem for p in (REPO / "conf" / "backbone").glob("*.yaml"))


def _instantiate(overrides: list[str], tmp_path: Path, image_size: int = 32):
    cfg = compose_config(overrides, tmp_path)
    return cfg, hydra.utils.instantiate(cfg.backbone, image_size=image_size)


def _pretrained(torch_home: Path, name: str) -> dict[str, torch.Tensor]:
    path = write_torchvision_weights(torch_home, names=(name,))[name]
    return torch.load(path, map_location="cpu")


def _layer_types(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module]


# ---- every config, stages ------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONE_CONFIGS)
def test_every_backbone_config_builds_with_features_and_stages(name, tmp_path):
    named = {
        "torchvision": ["backbone.name=resnet18"],
        "timm": ["backbone.name=resnet10t", "backbone.weights=none"],
    }
    overrides = [f"backbone={name}", *named.get(name, [])]
    _, backbone = _instantiate(overrides, tmp_path)
    assert backbone.out_features > 0 and backbone.stages
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, backbone.out_features)


def test_stages_are_the_natural_blocks():
    resnet = torchvision_backbone("resnet18", weights="none")
    assert resnet.stages == [[resnet.body.conv1, resnet.body.bn1]] + [
        [getattr(resnet.body, f"layer{i}")] for i in range(1, 5)
    ]
    vgg = torchvision_backbone("vgg11_bn", weights="none")
    assert len(vgg.stages) == 5 and all(isinstance(stage[-1], nn.MaxPool2d) for stage in vgg.stages)


def test_cnn_small_with_mlp_head_has_the_study_parameter_count(tmp_path):
    cfg, backbone = _instantiate(
        ["backbone=cnn_small", "head=mlp", "head.hidden=256", "head.batchnorm=false", "data=cifar100"],
        tmp_path,
    )
    head = hydra.utils.instantiate(cfg.head, in_features=backbone.out_features, num_classes=100)
    model = TransferModule(backbone, head, num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == 846_308


# ---- torchvision models by name ----------------------------------------------------------------
@pytest.mark.parametrize("name, features", [("efficientnet_b0", 1280), ("mobilenet_v3_small", 576)])
def test_torchvision_by_name_cuts_after_the_global_pool(name, features, tmp_path):
    import torchvision.models as tvm

    _, backbone = _instantiate(
        ["backbone=torchvision", f"backbone.name={name}", "backbone.weights=none"], tmp_path
    )
    assert backbone.out_features == features
    assert isinstance(backbone.body.classifier, nn.Identity)  # the whole classifier is gone
    # Same numbers as the torchvision model's own features -> avgpool, with the same weights.
    reference = tvm.get_model(name, weights=None)
    reference.load_state_dict({k[len("body.") :]: v for k, v in backbone.state_dict().items()}, strict=False)
    reference.eval(), backbone.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.flatten(reference.avgpool(reference.features(images)), 1)
        torch.testing.assert_close(backbone(images), expected)
    assert len(backbone.stages) == len(reference.features)  # features blocks, each with parameters


def test_torchvision_by_name_loads_imagenet_weights_without_the_classifier(torch_home):
    pretrained = _pretrained(torch_home, "mobilenet_v3_small")
    backbone = torchvision_backbone("mobilenet_v3_small", weights="imagenet")
    state = backbone.state_dict()
    assert all(
        torch.equal(state["body." + k], v) for k, v in pretrained.items() if not k.startswith("classifier.")
    )
    assert any(k.startswith("classifier.") for k in pretrained) and not any("classifier" in k for k in state)
    assert "IMAGENET1K" in backbone.weights_source and backbone.normalization["name"] == "imagenet"


def test_classifier_layers_before_the_first_linear_are_kept():
    convnext = torchvision_backbone("convnext_tiny", weights="none")
    assert _layer_types(convnext.body.classifier) == ["LayerNorm2d", "Flatten"]  # its features are normalized
    squeezenet = torchvision_backbone("squeezenet1_1", weights="none")
    assert _layer_types(squeezenet.body.classifier) == [
        "AdaptiveAvgPool2d"
    ]  # pooled, the 1x1 conv classifier gone
    assert squeezenet.out_features == 512


def test_unknown_torchvision_name_is_a_user_error():
    with pytest.raises(UserError, match="not a torchvision classification model"):
        torchvision_backbone("resnet19", weights="none")


# ---- CIFAR stem ------------------------------------------------------------------------------
def test_cifar_stem_replaces_the_first_conv_and_warns_with_pretrained_weights(torch_home):
    pretrained = _pretrained(torch_home, "resnet18")
    with pytest.warns(UserWarning, match="re-initialized"):
        backbone = torchvision_backbone("resnet18", weights="imagenet", cifar_stem=True)
    conv1 = backbone.body.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(backbone.body.maxpool, nn.Identity)
    state = backbone.state_dict()
    assert all(
        torch.equal(state["body." + k], v)
        for k, v in pretrained.items()
        if not k.startswith(("fc.", "conv1."))
    )
    # Without pretrained weights nothing is thrown away, so there is nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchvision_backbone("resnet18", weights="none", cifar_stem=True)


def test_cifar_stem_keeps_the_conv1_of_a_cifar_stem_checkpoint(tmp_path):
    source = torchvision_backbone("resnet18", weights="none", cifar_stem=True)
    path = tmp_path / "stem.pt"
    torch.save(source.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = torchvision_backbone("resnet18", weights=str(path), cifar_stem=True)
    assert torch.equal(loaded.body.conv1.weight, source.body.conv1.weight)


def test_cifar_stem_is_for_resnets_only():
    with pytest.raises(UserError, match="ResNets only"):
        torchvision_backbone("mobilenet_v3_small", weights="none", cifar_stem=True)


# ---- vgg_blocks -------------------------------------------------------------------------------
def test_vgg_blocks_default_is_conv_bn_conv_maxpool_dropout(tmp_path):
    _, backbone = _instantiate(["backbone=vgg_blocks"], tmp_path)
    body = backbone.body
    assert _layer_types(body.conv1) == [
        "Conv2d",
        "ReLU",
        "BatchNorm2d",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Dropout",
    ]
    assert [getattr(body, f"conv{i}")[0].out_channels for i in (1, 2, 3)] == [32, 64, 128]
    assert _layer_types(body.dense1) == ["Linear", "ReLU", "Dropout"]
    assert body.dense1[0].in_features == 128 * 4 * 4 and backbone.out_features == 128
    assert len(backbone.stages) == 4  # three conv blocks and the dense block


@pytest.mark.parametrize(
    "block, types",
    [
        (
            "bn-conv-bn-conv-maxpool-dropout",
            ["BatchNorm2d", "Conv2d", "ReLU", "BatchNorm2d", "Conv2d", "ReLU", "MaxPool2d", "Dropout"],
        ),
        (
            "conv-bn-conv-bn-maxpool",
            ["Conv2d", "ReLU", "BatchNorm2d", "Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d"],
        ),
        (
            "conv-dropout-conv-dropout-maxpool",
            ["Conv2d", "ReLU", "Dropout", "Conv2d", "ReLU", "Dropout", "MaxPool2d"],
        ),
        ("[conv,maxpool]", ["Conv2d", "ReLU", "MaxPool2d"]),
    ],
)
def test_vgg_blocks_conv_block_variants(block, types, tmp_path):
    _, backbone = _instantiate(["backbone=vgg_blocks", f"backbone.conv_block={block}"], tmp_path)
    assert _layer_types(backbone.body.conv2) == types
    assert backbone.body.conv1[0 if types[0] == "Conv2d" else 1].in_channels == 3


@pytest.mark.parametrize(
    "block, types",
    [
        ("dense-dropout", ["Linear", "ReLU", "Dropout"]),
        ("dense-bn", ["Linear", "ReLU", "BatchNorm1d"]),
        ("dense-bn-dropout", ["Linear", "ReLU", "BatchNorm1d", "Dropout"]),
    ],
)
def test_vgg_blocks_dense_block_variants_sizes_and_dropout(block, types, tmp_path):
    overrides = [
        "backbone=vgg_blocks",
        f"backbone.dense_block={block}",
        "backbone.dense_sizes=[64,32]",
        "backbone.channels=[8,16]",
        "backbone.dropout=0.4",
    ]
    _, backbone = _instantiate(overrides, tmp_path)
    assert _layer_types(backbone.body.dense1) == types and _layer_types(backbone.body.dense2) == types
    assert backbone.body.dense1[0].in_features == 16 * 8 * 8 and backbone.out_features == 32
    assert all(m.p == 0.4 for m in backbone.modules() if isinstance(m, nn.Dropout))


def test_vgg_blocks_rejects_unknown_layers():
    with pytest.raises(UserError, match="conv_block.*unknown \\['pool'\\]"):
        vgg_blocks(conv_block="conv-pool")
    with pytest.raises(UserError, match="dense_block"):
        vgg_blocks(dense_block="bn-dropout")  # no dense layer


# ---- truncated_resnet ----------------------------------------------------------------------
def test_truncated_resnet50_keeps_stem_layer1_layer2_minus_dropped_blocks(torch_home, tmp_path):
    pretrained = _pretrained(torch_home, "resnet50")
    _, backbone = _instantiate(["backbone=truncated_resnet", "backbone.drop_layer2_blocks=[3]"], tmp_path)
    assert [name for name, _ in backbone.body.named_children()] == [
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1",
        "layer2",
    ]
    assert list(backbone.body.layer2._modules) == ["0", "1", "2"]
    assert backbone.out_features == 512 and isinstance(backbone.pool, nn.AdaptiveAvgPool2d)
    state = backbone.state_dict()
    assert state.keys() == {
        "body." + k
        for k in pretrained
        if k.startswith(("conv1.", "bn1.", "layer1.", "layer2.")) and not k.startswith("layer2.3.")
    }
    assert all(torch.equal(v, pretrained[k[len("body.") :]]) for k, v in state.items())


def test_truncated_resnet_takes_its_tensors_from_a_full_resnet_checkpoint(tmp_path):
    full = torchvision_backbone("resnet50", weights="none", cifar_stem=True)
    path = tmp_path / "cifar10_resnet50.ckpt"
    state = {"backbone." + k: v for k, v in full.state_dict().items()}
    state["head.0.weight"] = torch.zeros(10, 2048)
    torch.save(
        {
            "state_dict": state,
            "transferlab": {"data": {"normalization": "cifar", "mean": [0.5] * 3, "std": [0.25] * 3}},
        },
        path,
    )

    backbone = truncated_resnet("resnet50", weights=str(path), cifar_stem=True, drop_layer2_blocks=[3])
    own = backbone.state_dict()
    assert own and all(torch.equal(v, full.state_dict()[k]) for k, v in own.items())
    assert backbone.normalization["mean"] == [0.5] * 3


def test_truncated_resnet_reports_an_architecture_mismatch(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision_backbone("resnet18", weights="none").state_dict(), path)
    with pytest.raises(UserError, match=r"missing keys \['body.layer1.0.conv3.weight'"):
        truncated_resnet("resnet50", weights=str(path))


@pytest.mark.parametrize("blocks", [[0], [4]])
def test_truncated_resnet_drops_only_identity_blocks(blocks):
    with pytest.raises(UserError, match="only blocks 1..3 can be dropped"):
        truncated_resnet("resnet50", weights="none", drop_layer2_blocks=blocks)


def test_truncated_resnet_needs_a_resnet():
    with pytest.raises(UserError, match="needs a ResNet"):
        truncated_resnet("mobilenet_v3_small", weights="none")
