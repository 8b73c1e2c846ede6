"""Tiny datasets and weight files in the official formats, written by the tests themselves."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch


def _class_images(rng: np.random.Generator, labels: np.ndarray, size: int = 32) -> np.ndarray:
    """Images whose mean colour depends on the class, so a head can learn something."""
    base = (labels[:, None] * 23 % 256).astype(np.float32)
    noise = rng.normal(0, 40, size=(len(labels), 3 * size * size)).astype(np.float32)
    return np.clip(base + noise + 60, 0, 255).astype(np.uint8)


def write_cifar10(root: Path, per_class_train: int = 30, per_class_test: int = 10, seed: int = 0) -> Path:
    """`root/cifar-10-batches-py/` exactly as the official python-version files are pickled."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train_labels = rng.permutation(np.repeat(np.arange(10), per_class_train))
    chunks = np.array_split(np.arange(len(train_labels)), 5)
    for i, chunk in enumerate(chunks, start=1):
        labels = train_labels[chunk]
        _dump(
            folder / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": labels.tolist(),
                b"data": _class_images(rng, labels),
                b"filenames": [f"img_{i}_{j}.png".encode() for j in range(len(labels))],
            },
        )
    test_labels = rng.permutation(np.repeat(np.arange(10), per_class_test))
    _dump(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": test_labels.tolist(),
            b"data": _class_images(rng, test_labels),
            b"filenames": [f"test_{j}.png".encode() for j in range(len(test_labels))],
        },
    )
    _dump(
        folder / "batches.meta",
        {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 10000, b"num_vis": 3072},
    )
    return Path(root)


def write_cifar100(root: Path, per_class_train: int = 6, per_class_test: int = 2, seed: int = 0) -> Path:
    """`root/cifar-100-python/` (train, test, meta) with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        _dump(
            folder / split,
            {
                b"filenames": [f"{split}_{j}.png".encode() for j in range(len(fine))],
                b"batch_label": split.encode(),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": (fine // 5).tolist(),
                b"data": _class_images(rng, fine),
            },
        )
    _dump(
        folder / "meta",
        {
            b"fine_label_names": [f"class{i:03d}".encode() for i in range(100)],
            b"coarse_label_names": [f"super{i:02d}".encode() for i in range(20)],
        },
    )
    return Path(root)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_torchvision_weights(
    torch_home: Path, names=("vgg11_bn", "resnet18"), seed: int = 123
) -> dict[str, Path]:
    """Random state dicts saved where torchvision looks for its ImageNet weights."""
    import torchvision.models as tvm

    checkpoints = Path(torch_home) / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    paths = {}
    torch.manual_seed(seed)
    for name in names:
        weights = tvm.get_model_weights(name).DEFAULT
        path = checkpoints / os.path.basename(weights.url)
        if not path.exists():
            model = tvm.get_model(name, weights=None)
            # Non-trivial BatchNorm statistics, so "unchanged" tests can tell.
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
            torch.save(model.state_dict(), path)
        paths[name] = path
    return paths


def write_png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG (grey (H, W) or 48-bit RGB (H, W, 3) uint16), written byte by byte.

    PIL writes 16-bit grey (mode I;16) but not 48-bit RGB, so the format is spelled out here.
    """
    import struct
    import zlib

    pixels = np.asarray(pixels, dtype=">u2")  # PNG stores samples big-endian
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    rows = pixels.reshape(height, -1).tobytes()
    stride = len(rows) // height
    raw = b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path = Path(path)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path
