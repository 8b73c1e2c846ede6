"""Images per second: transferlab's tensor pipeline vs torchvision's PIL pipeline.

    python benchmarks/data_pipeline.py --root /path/to/cifar   # holds cifar-10-batches-py/

Both read the same CIFAR-10 training set with one CPU thread and produce normalized float
batches of 256: (a) transferlab's uint8 tensor in memory + batched crop/flip/resize/normalize
(`CIFAR10DataModule.preprocess`), (b) torchvision's `CIFAR10` dataset with a
`transforms.Compose` of RandomCrop(32, padding=4), RandomHorizontalFlip, [Resize(224),]
ToTensor, Normalize, in a DataLoader. Median of --reps repetitions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.utils.data import DataLoader

from transferlab import CIFAR10DataModule
from transferlab.data.normalization import IMAGENET_MEAN, IMAGENET_STD

BATCH = 256


def transferlab_rate(root: str, size: int, n_images: int) -> float:
    dm = CIFAR10DataModule(
        root=root,
        download=False,
        image_size=size,
        augment=True,
        batch_size=BATCH,
        normalization="imagenet",
        val_size=5000,
    )
    dm.setup("fit")
    started, seen = time.perf_counter(), 0
    for images, labels in dm.train_dataloader():
        out = dm.preprocess(images, train=True)
        seen += len(out)
        if seen >= n_images:
            break
    return seen / (time.perf_counter() - started)


def torchvision_rate(root: str, size: int, n_images: int) -> float:
    from torchvision import datasets, transforms
    from torchvision.datasets import cifar

    # A re-encoded copy's MD5 differs from the official one; torchvision would refuse it.
    cifar.check_integrity = lambda *args, **kwargs: True

    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    if size != 32:
        steps.append(transforms.Resize(size))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    dataset = datasets.CIFAR10(root, train=True, download=False, transform=transforms.Compose(steps))
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0)
    started, seen = time.perf_counter(), 0
    for images, labels in loader:
        seen += len(images)
        if seen >= n_images:
            break
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--images-32", type=int, default=20480)
    parser.add_argument("--images-224", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"# data pipeline: images/s, 1 CPU thread, batch {BATCH}, median of {args.reps}")
    print(f"# torch {torch.__version__}, {os.cpu_count()} cores on the machine")
    print(f"| {'size':>6} | {'transferlab':>12} | {'torchvision':>12} | {'ratio':>6} |")
    print(f"|{'-' * 8}|{'-' * 14}|{'-' * 14}|{'-' * 8}|")
    for size, n in ((32, args.images_32), (224, args.images_224)):
        ours = statistics.median(transferlab_rate(args.root, size, n) for _ in range(args.reps))
        theirs = statistics.median(torchvision_rate(args.root, size, n) for _ in range(args.reps))
        print(f"| {size:>4}px | {ours:>12,.0f} | {theirs:>12,.0f} | {ours / theirs:>5.1f}x |", flush=True)


if __name__ == "__main__":
    main()
