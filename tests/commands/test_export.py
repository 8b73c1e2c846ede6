"""`python -m transferlab.export` and checkpoints that stand alone, through the real command line.

The exported files are run as their users run them (onnxruntime, torch.jit.load) on uint8
images at the run's size, and must give the PyTorch model's probabilities. Two models: the
tiny cnn_small run of test_predict.py, and EfficientNet-Lite0 with its real ImageNet weights
at 64 px in channels-last layout (timm's "same" padding, another memory format).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import cli, cli_env, tiny_run, train_once
from test_predict import error_lines

#: EfficientNet-Lite0, real weights (the `weights` extra), frozen, one training and one validation batch
LITE0_RUN = [o for o in tiny_run() if not o.startswith("backbone=")] + [
    "backbone=efficientnet_lite0",
    "mode=frozen",
    "data.image_size=64",
    "data.cache_features=false",
    "model.channels_last=true",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "test=false",
    "data.download=false",
]
#: the issue's bar for the exported model against PyTorch
TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def lite0_run(tmp_path_factory, cifar10_root, torch_home, transferlab_cache) -> Path:
    return train_once(
        tmp_path_factory, "lite0", LITE0_RUN + [f"data.root={cifar10_root}"], torch_home, transferlab_cache
    )


def pytorch_probabilities(run_dir: Path, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The trained model's softmax on uint8 `images`, normalized by hand with the checkpoint's mean/std."""
    from transferlab.models import TransferModule

    model = TransferModule.load_from_checkpoint(run_dir).eval()
    data = model.data_info
    mean = torch.tensor(data["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((images.float() / 255.0 - mean) / std).softmax(dim=1), data


def run_exported(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.type for i in session.get_inputs()] == ["tensor(uint8)"]
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript, still loads it
        module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(images)


def random_images(count: int, size: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize(
    "model, fmt",
    [
        ("cnn_small", "onnx"),  # the fast tier's export, through the real command
        pytest.param("cnn_small", "torchscript", marks=pytest.mark.slow),
        pytest.param("lite0", "onnx", marks=pytest.mark.slow),
        pytest.param("lite0", "torchscript", marks=pytest.mark.slow),
    ],
    ids=["onnx-cnn_small", "torchscript-cnn_small", "onnx-lite0", "torchscript-lite0"],
)
def test_exported_model_gives_pytorch_probabilities(request, model, fmt, tmp_path, torch_home):
    run_dir = request.getfixturevalue("cnn_run" if model == "cnn_small" else "lite0_run")
    out = tmp_path / f"model.{fmt}"
    out.write_text("an older export\n")  # --force replaces it

    result = cli(
        [str(run_dir), "--format", fmt, "--out", str(out), "--force"],
        tmp_path,
        torch_home,
        module="transferlab.export",
    )

    assert result.returncode == 0, result.stderr
    # A batch size the export never saw (the batch axis is free), at the run's own image size.
    size = 32 if model == "cnn_small" else 64
    images = random_images(5, size)
    expected, data = pytorch_probabilities(run_dir, images)
    got = run_exported(fmt, out, images)
    assert data["image_size"] == size
    assert got.shape == expected.shape == (5, 10)
    assert (got - expected).abs().max().item() <= TOLERANCE
    described = json.loads(Path(f"{out}.classes.json").read_text())
    assert described["classes"] == data["class_names"]
    assert described["input"]["shape"] == ["N", 3, size, size]


@pytest.mark.slow
def test_existing_export_is_not_overwritten(cnn_run, tmp_path, torch_home):
    (tmp_path / "model.onnx.classes.json").write_text("mine\n")

    result = cli([str(cnn_run), "--format", "onnx"], tmp_path, torch_home, module="transferlab.export")

    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "transferlab: error: model.onnx.classes.json already exists; choose another --out, or add --force to overwrite it"
    ]
    assert (tmp_path / "model.onnx.classes.json").read_text() == "mine\n"
    assert not (tmp_path / "model.onnx").exists()


def _export_over_the_checkpoint(tmp_path: Path, run: Path) -> tuple[list[str], str]:
    checkpoint = tmp_path / "copy.ckpt"
    checkpoint.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    return [
        str(checkpoint),
        "--format",
        "torchscript",
        "--out",
        str(checkpoint),
        "--force",
    ], f"would overwrite {checkpoint}, which this command reads"


def _export_under_a_file(tmp_path: Path, run: Path) -> tuple[list[str], str]:
    (tmp_path / "notes.txt").write_text("mine\n")
    out = tmp_path / "notes.txt" / "model.onnx"
    return [
        str(run),
        "--format",
        "onnx",
        "--out",
        str(out),
    ], f"cannot write --out {out}: {tmp_path / 'notes.txt'} is a file, not a folder"


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_args",
    [_export_over_the_checkpoint, _export_under_a_file],
    ids=["over-the-checkpoint", "under-a-file"],
)
def test_an_out_that_cannot_or_must_not_be_written_is_one_line_before_exporting(
    cnn_run, tmp_path, torch_home, make_args
):
    args, message = make_args(tmp_path, cnn_run)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    result = cli(args, tmp_path, torch_home, module="transferlab.export")

    assert result.returncode == 2
    assert error_lines(result.stderr) == [result.stderr.strip()], result.stderr
    assert message in result.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


#: a fresh interpreter with the network unusable: loading must need neither it nor the run's config
FRESH_LOAD = """
import json, socket, sys

class NoNetwork(socket.socket):
    def connect(self, *args, **kwargs):
        raise OSError("loading a checkpoint tried to use the network")

socket.socket = NoNetwork
import torch
from transferlab.models import TransferModule

report = {}
for path in sys.argv[1:]:
    model = TransferModule.load_from_checkpoint(path).eval()
    saved = torch.load(path if path.endswith(".ckpt") else path + "/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    with torch.no_grad():
        out = model(torch.zeros(2, 3, model.data_info["image_size"], model.data_info["image_size"]))
    report[path] = {
        "backbone": model.backbone.name,
        "channels_last": model.channels_last,
        "same_keys": sorted(model.state_dict()) == sorted(saved),
        "classes": model.data_info["class_names"],
        "output": list(out.shape),
    }
print(json.dumps(report))
"""


@pytest.mark.slow
def test_load_from_checkpoint_alone_in_a_fresh_process(cnn_run, lite0_run, tmp_path, torch_home):
    """A run dir (its best checkpoint) and a checkpoint file, each with no other argument."""
    lite0_best = sorted((lite0_run / "checkpoints").glob("best-*.ckpt"))[-1]
    empty_home = tmp_path / "empty_torch_home"  # no weights files to fall back on
    empty_home.mkdir()

    result = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, str(cnn_run), str(lite0_best)],
        cwd=tmp_path,
        env=cli_env(empty_home, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    cnn, lite0 = report[str(cnn_run)], report[str(lite0_best)]
    assert (cnn["backbone"], cnn["channels_last"], lite0["backbone"], lite0["channels_last"]) == (
        "cnn_small",
        False,
        "efficientnet_lite0",
        True,
    )
    assert cnn["same_keys"] and lite0["same_keys"]
    assert cnn["output"] == lite0["output"] == [2, 10]
    assert cnn["classes"][0] == "airplane"
    # Weights: the loaded state dict is the checkpoint's, tensor for tensor.
    from transferlab.models import TransferModule

    loaded = TransferModule.load_from_checkpoint(lite0_best).state_dict()
    saved = torch.load(lite0_best, weights_only=False)["state_dict"]
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_rebuild_keeps_what_the_weights_decided(tmp_path):
    """GoogLeNet with ImageNet weights remaps its input (transform_input), a flag no tensor holds:
    the record keeps it, and the rebuild (weights none) sets it back instead of silently dropping it."""
    from omegaconf import OmegaConf

    from transferlab.models import TransferModule, linear_head, torchvision_backbone
    from transferlab.models.architecture import architecture_record, rebuild_arguments

    cfg = OmegaConf.create(
        {
            "backbone": {
                "_target_": "transferlab.models.torchvision_backbone",
                "name": "googlenet",
                "weights": "imagenet",
            },
            "head": {"_target_": "transferlab.models.linear_head", "dropout": 0.0},
            "data": {"image_size": 64},
        }
    )
    backbone = torchvision_backbone("googlenet", weights="none", image_size=64)
    backbone.body.transform_input = True  # what loading the ImageNet weights sets
    model = TransferModule(backbone, linear_head(backbone.out_features, 3), num_classes=3)
    data = {"class_names": ["a", "b", "c"], "image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
    record = {
        "data": data,
        "num_classes": 3,
        "architecture": architecture_record(cfg.backbone, cfg.head, cfg.data.image_size, backbone, 3),
    }
    torch.save({"state_dict": model.state_dict(), "transferlab": record}, tmp_path / "googlenet.ckpt")

    _, rebuilt = rebuild_arguments(tmp_path / "googlenet.ckpt")

    assert rebuilt["backbone"].body.transform_input is True
    assert rebuilt["backbone"].weights_source == "random init"  # nothing was loaded: the state dict fills it
