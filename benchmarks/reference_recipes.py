"""The lite0 presets held against a plain PyTorch loop on the very same training images (issue 19).

    python benchmarks/reference_recipes.py --root /path/to/cifar [--arms frozen finetune scratch]
        [--seeds 0 1 2] [--per-class 50] [--image-size 96] [--out outputs/reference_recipes]

For each arm and seed:
1. the project: `python -m transferlab experiment=lite0_<arm> data.image_size=S
   data.fewshot.per_class=K seed=N test=true` as a user runs it (its own process), which picks its
   best epoch on its 500 validation images and reports `test/acc` on all 10,000 test images;
2. the plain loop: the same network (EfficientNet-Lite0; the ImageNet weights taken from the
   package's built backbone, random init for scratch) trained on the very same training images
   (read from the project run's `fewshot_indices.json`) for the project run's number of epochs (no
   more), by a loop that shares no other code with the package: its own CIFAR reader, augmentation,
   optimizer and schedule, the last epoch tested on all 10,000 test images.

The plain recipes are the usual ones:
- frozen: a linear head on un-augmented features computed once (eval mode), Adam at 1e-3,
  batches of 32, cross-entropy;
- finetune and scratch: a timm-style fine-tuning recipe: SGD with Nesterov momentum 0.9,
  weight decay 5e-4, a one-cycle schedule (peak 0.01 fine-tuning, 0.05 from scratch), random
  flip and 4 px pad-crop at 32 px, label smoothing 0.1, batches of 32, everything training.

Prints project vs plain per arm (mean ± std over the seeds, the difference, the epochs) and the
elapsed time. Goal (issue 19): each preset's mean >= the plain loop's mean - 0.5 points.
Run it alone, one thread (OMP_NUM_THREADS=1): at 96 px the whole table is long (frozen a few
minutes, finetune about 3 minutes a run, scratch its epochs times about 15 s, each twice per seed).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN = STD = 0.5  # tf_efficientnet_lite0's normalization (timm's pretrained_cfg)
PLAIN = {
    "frozen": {"lr": 1e-3},
    "finetune": {"lr": 0.01},
    "scratch": {"lr": 0.05},
}


# ---- data: the official CIFAR-10 python files, read here ------------------------------------
def read_cifar(root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    folder = root / "cifar-10-batches-py"

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        return batch[b"data"].reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"])

    parts = [load(f"data_batch_{i}") for i in range(1, 6)]
    train_x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    test_x, test_y = (torch.from_numpy(a) for a in load("test_batch"))
    return train_x, train_y, test_x, test_y


def prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    x = (images.float() / 255 - MEAN) / STD
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and 4 px zero-pad random crop, on uint8 32 px images."""
    n = len(images)
    flip = torch.rand(n, generator=gen) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    padded = F.pad(images, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, n), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(n)])


# ---- the plain loops ------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, backbone: nn.Module, features: int, classes: int):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(features, classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def lite0_backbone(pretrained: bool) -> tuple[nn.Module, int]:
    """The network only: the package builds it (and loads its ImageNet weights); nothing else is shared."""
    from transferlab.models import efficientnet_lite

    backbone = efficientnet_lite("lite0", "imagenet" if pretrained else "none")
    return backbone, backbone.out_features


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, size: int, batch: int = 250) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [model(prepare(images[i : i + batch], size)).argmax(1) for i in range(0, len(images), batch)]
    )


@torch.no_grad()
def features(backbone: nn.Module, images: torch.Tensor, size: int, batch: int = 250) -> torch.Tensor:
    backbone.eval()
    return torch.cat([backbone(prepare(images[i : i + batch], size)) for i in range(0, len(images), batch)])


def plain_frozen(train_x, train_y, test_x, test_y, size, epochs, seed) -> float:
    torch.manual_seed(seed)
    backbone, width = lite0_backbone(pretrained=True)
    train_f, test_f = features(backbone, train_x, size), features(backbone, test_x, size)
    head = nn.Linear(width, 10)
    opt = torch.optim.Adam(head.parameters(), lr=PLAIN["frozen"]["lr"])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_f), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(head(train_f[idx]), train_y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return (head(test_f).argmax(1) == test_y).float().mean().item()


def plain_train(arm, train_x, train_y, test_x, test_y, size, epochs, seed) -> float:
    torch.manual_seed(seed)
    backbone, width = lite0_backbone(pretrained=arm == "finetune")
    model = Net(backbone, width, 10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(), lr=PLAIN[arm]["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    steps = epochs * math.ceil(len(train_x) / 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=PLAIN[arm]["lr"], total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(train_x), generator=gen).split(32):
            if len(idx) < 2:  # BatchNorm needs two images
                continue
            opt.zero_grad()
            loss = F.cross_entropy(
                model(prepare(augment(train_x[idx], gen), size)), train_y[idx], label_smoothing=0.1
            )
            loss.backward()
            opt.step()
            sched.step()
    return (predict(model, test_x, size) == test_y).float().mean().item()


# ---- the project run ------------------------------------------------------------------------
def project_run(arm, root, out: Path, per_class, size, seed, extra) -> tuple[float, list[int], int]:
    run_dir = out / "project" / arm / f"seed{seed}"
    if not (run_dir / "metrics.json").is_file():
        command = [
            sys.executable, "-m", "transferlab", f"experiment=lite0_{arm}", f"data.root={root}",
            "data.download=false", f"data.image_size={size}", f"data.fewshot.per_class={per_class}",
            f"seed={seed}", "test=true", f"hydra.run.dir={run_dir}", *extra,
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    indices = json.loads((run_dir / "fewshot_indices.json").read_text())["indices"]
    return float(metrics["test/acc"]), indices, int(metrics["epochs"])


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, type=Path, help="folder that holds cifar-10-batches-py/")
    parser.add_argument("--arms", nargs="+", default=["frozen", "finetune", "scratch"], choices=list(PLAIN))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("outputs/reference_recipes"))
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for the project runs")
    args = parser.parse_args()

    started = time.perf_counter()
    train_x, train_y, test_x, test_y = read_cifar(args.root)
    rows = []
    for arm in args.arms:
        project, plain, epochs = [], [], set()
        for seed in args.seeds:
            acc, indices, ran = project_run(
                arm, args.root, args.out, args.per_class, args.image_size, seed, args.extra
            )
            idx = torch.tensor(indices)
            x, y = train_x[idx], train_y[idx]
            if arm == "frozen":
                ref = plain_frozen(x, y, test_x, test_y, args.image_size, ran, seed)
            else:
                ref = plain_train(arm, x, y, test_x, test_y, args.image_size, ran, seed)
            project.append(acc)
            plain.append(ref)
            epochs.add(ran)
            print(
                f"{arm} seed {seed}: project {100 * acc:.1f}%, plain {100 * ref:.1f}% ({ran} epochs)",
                flush=True,
            )
        diff = 100 * (statistics.mean(project) - statistics.mean(plain))
        rows.append((arm, mean_std(project), mean_std(plain), diff, sorted(epochs)))
    print(
        f"\nEfficientNet-Lite0 (ImageNet weights; scratch: random init), {args.per_class} images per class, "
        f"{args.image_size} px, seeds {', '.join(map(str, args.seeds))}; test accuracy on all {len(test_y)} test images\n"
    )
    print("| arm | project preset (%) | plain loop (%) | project − plain (points) | epochs | goal ≥ −0.5 |")
    print("|---|---|---|---|---|---|")
    for arm, ours, ref, diff, epochs in rows:
        ok = "yes" if diff >= -0.5 else "no"
        print(f"| {arm} | {ours} | {ref} | {diff:+.1f} | {', '.join(map(str, epochs))} | {ok} |")
    print(f"\nelapsed {time.perf_counter() - started:.0f} s, {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
