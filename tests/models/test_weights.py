"""Where backbone weights come from: ImageNet enums, plain state dicts, and earlier runs' checkpoints."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from conftest import compose_config, run_training, tiny_run

from transferlab.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from transferlab.data.normalization import describe_weights, resolve_normalization
from transferlab.models import cnn_small, torchvision_backbone
from transferlab.utils.errors import UserError

RESNET18_FILE = "resnet18-f37072fd.pth"


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU runs: see conftest.one_thread


def _file(torch_home: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(torch_home / "hub" / "checkpoints" / name, map_location="cpu")


def _body(backbone) -> dict[str, torch.Tensor]:
    return {k[len("body.") :]: v for k, v in backbone.state_dict().items()}


# ---- ImageNet weights ---------------------------------------------------------------------
def test_imagenet_and_the_explicit_enum_name_load_the_same_file(torch_home):
    pretrained = _file(torch_home, RESNET18_FILE)
    default = torchvision_backbone("resnet18", weights="imagenet")
    explicit = torchvision_backbone("resnet18", weights="IMAGENET1K_V1")
    for key, value in _body(default).items():
        assert torch.equal(value, pretrained[key]) and torch.equal(_body(explicit)[key], value), key
    assert default.weights_source == explicit.weights_source == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert default.normalization["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(
        UserError, match="IMAGENET1K_V9.*choose one of imagenet, none, IMAGENET1K_V1, IMAGENET1K_V2"
    ):
        torchvision_backbone("resnet50", weights="IMAGENET1K_V9")


def test_none_means_random_init(torch_home):
    backbone = torchvision_backbone("resnet18", weights="none")
    assert backbone.weights_source == "random init" and backbone.normalization is None
    assert not torch.equal(_body(backbone)["conv1.weight"], _file(torch_home, RESNET18_FILE)["conv1.weight"])


# ---- plain state dict files ------------------------------------------------------------------
def test_plain_state_dicts_load_in_torchvision_or_transferlab_form(torch_home, tmp_path):
    pretrained = _file(torch_home, RESNET18_FILE)
    torchvision_form = tmp_path / "imagenet_resnet18.pth"
    torch.save(pretrained, torchvision_form)  # with its fc.* keys, as torchvision saves it
    from_pth = torchvision_backbone("resnet18", weights=str(torchvision_form))
    transferlab_form = tmp_path / "backbone.pt"
    torch.save(from_pth.state_dict(), transferlab_form)
    from_pt = torchvision_backbone("resnet18", weights=str(transferlab_form))
    for key, value in _body(from_pt).items():
        assert torch.equal(value, pretrained[key]) and torch.equal(_body(from_pth)[key], value), key
    assert from_pt.normalization is None  # a plain state dict says nothing about its data


def test_safetensors_file_loads(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    source = cnn_small(weights="none")
    path = tmp_path / "cnn.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert all(
        torch.equal(v, source.state_dict()[k]) for k, v in cnn_small(weights=str(path)).state_dict().items()
    )


# ---- errors ----------------------------------------------------------------------------------
def test_architecture_mismatch_lists_the_first_missing_and_unexpected_keys(torch_home, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(_file(torch_home, RESNET18_FILE), path)
    with pytest.raises(UserError) as error:
        torchvision_backbone("vgg11_bn", weights=str(path))
    message = str(error.value)
    assert "do not match the backbone architecture" in message
    assert "missing keys ['body.0.weight', 'body.0.bias', 'body.1.weight'] ..." in message
    assert "unexpected keys ['conv1.weight', 'bn1.weight', 'bn1.bias'] ..." in message


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    path = tmp_path / "cnn.pt"
    torch.save(cnn_small(weights="none").state_dict(), path)
    with pytest.raises(
        UserError,
        match=r"body.0.0.weight has shape \(16, 3, 3, 3\) in the file but \(8, 3, 3, 3\) in the model",
    ):
        cnn_small(channels=(8, 32, 64, 128, 512), weights=str(path))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ([1, 2], "holds a list"),
        ({"a": 1}, "not a state dict"),
        (b"junk", "not a readable"),
    ],
)
def test_unusable_weights_files_are_user_errors(content, message, tmp_path):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=message):
        cnn_small(weights=str(path))


def test_custom_backbones_have_no_imagenet_weights():
    with pytest.raises(UserError, match="cnn_small has no pretrained weights"):
        cnn_small(weights="imagenet")


# ---- a checkpoint carried to a new task -------------------------------------------------------
@pytest.fixture(scope="module")
def cifar10_checkpoint(cifar10_root, tmp_path_factory) -> Path:
    """A cnn_small run on CIFAR-10 with the dataset's normalization: the source of the transfer."""
    run_dir = tmp_path_factory.mktemp("cifar10_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(
            [
                "backbone=cnn_small",
                "head=mlp",
                f"data.root={cifar10_root}",
                *tiny_run({"backbone": None}),
                "trainer.limit_train_batches=2",
                "data.normalization=cifar",
                "test=false",
            ],
            run_dir,
        )
    finally:
        torch.set_num_threads(threads)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("target", ["cifar100", "cifar10_subset"])
def test_checkpoint_backbone_carries_to_a_new_task_with_a_new_head(
    target, cifar10_checkpoint, cifar10_root, cifar100_root, tmp_path
):
    source = torch.load(cifar10_checkpoint, map_location="cpu", weights_only=False)
    source_backbone = {
        k[len("backbone.") :]: v for k, v in source["state_dict"].items() if k.startswith("backbone.")
    }
    if target == "cifar100":
        data, num_classes = ["data=cifar100", f"data.root={cifar100_root}", "data.val_size=100"], 100
    else:
        data, num_classes = [f"data.root={cifar10_root}", "data.classes=[cat,dog]"], 2
    overrides = [
        "backbone=cnn_small",
        "head=mlp",
        f"backbone.weights={cifar10_checkpoint}",
        *tiny_run({"backbone": None}),
        *data,
        "trainer.limit_train_batches=1",
        "test=false",
    ]

    # At the start: the backbone is the checkpoint's, bit for bit (BatchNorm statistics too).
    backbone = hydra.utils.instantiate(
        compose_config(overrides, tmp_path / "compose").backbone, image_size=32
    )
    assert backbone.state_dict().keys() == source_backbone.keys()
    assert all(torch.equal(v, source_backbone[k]) for k, v in backbone.state_dict().items())
    # ... and the data would be normalized like the checkpoint's run: CIFAR-10 statistics.
    resolved = resolve_normalization(
        None, describe_weights(backbone), dataset_stats=lambda: pytest.fail("not asked")
    )
    assert (
        list(resolved.mean) == list(CIFAR10DataModule.dataset_mean) == source["transferlab"]["data"]["mean"]
    )
    assert list(resolved.mean) != list(CIFAR100DataModule.dataset_mean)

    run_training([*overrides, "mode=frozen"], tmp_path / "run")
    trained = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    state = trained["state_dict"]
    assert state["head.3.weight"].shape == (num_classes, 256)  # a new head for the new classes
    assert all(
        torch.equal(state["backbone." + k], v) for k, v in source_backbone.items()
    )  # frozen: unchanged
    assert trained["transferlab"]["data"]["mean"] == source["transferlab"]["data"]["mean"]
    assert trained["transferlab"]["num_classes"] == num_classes


def test_explicit_normalization_wins_over_the_checkpoint_with_a_warning(cifar10_checkpoint):
    backbone = cnn_small(weights=str(cifar10_checkpoint))
    with pytest.warns(
        UserWarning,
        match=r"data.normalization=imagenet but the backbone weights .* were trained with mean=\[0.4914",
    ):
        resolved = resolve_normalization(
            "imagenet", describe_weights(backbone), dataset_stats=lambda: pytest.fail("not asked")
        )
    assert resolved.name == "imagenet" and resolved.mean == (0.485, 0.456, 0.406)
