"""A frozen run against the naive way (issue 22, item 1), both timed as whole processes.

    python benchmarks/frozen_vs_naive.py --root /path/to/cifar [--per-class 500] [--epochs 30]

The run: `python -m transferlab experiment=vgg_frozen backbone=resnet18 head=mlp
data.val_size=500 data.augment=false trainer.max_epochs=30 data.fewshot.per_class=500`, random
stand-in weights under torchvision's resnet18 file name (a temporary TORCH_HOME: speed does not
depend on the values) and a cold feature cache (a temporary TRANSFERLAB_CACHE). Its time split:
start-up (process start to its `seed:` log line), the feature pass (`features_time_s`), the head's
epochs with validation every epoch (`train_time_s`), and the rest (test, per-class results,
writing).

The naive way: a plain PyTorch loop in its own process, the way the studies do it: torchvision's
`CIFAR10` with `transforms.Compose` (ToTensor, Normalize), a DataLoader, every image through the
frozen backbone every epoch, the same head (Linear-BatchNorm-ReLU-Linear), SGD with momentum and
cosine, the same training images (the run's `fewshot_indices.json`), 500 validation images every
epoch and the 10,000 test images at the end. Both use the machine's threads (torch's default).

Prints the CPU model and flags, the two rows and their ratio (goal: at least 7x). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import cpu  # noqa: E402  (the CPU line every benchmark prints)

NAIVE = textwrap.dedent(
    """
    import json, math, sys, time
    import torch, torchvision
    from torch import nn
    from torchvision import transforms

    root, indices_file, epochs, weights = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18()
    backbone.load_state_dict(torch.load(weights, map_location="cpu"))
    backbone.fc = nn.Identity()
    backbone.eval().requires_grad_(False)
    head = nn.Sequential(nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
    normalize = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    preprocess = transforms.Compose([transforms.ToTensor(), normalize])

    class CIFAR10(torchvision.datasets.CIFAR10):
        # a copy rebuilt from the images has other MD5s than the archive's: no integrity check
        def _check_integrity(self):
            return True

        def _load_meta(self):
            self.classes = [str(i) for i in range(10)]

    train_set = CIFAR10(root, train=True, transform=preprocess, download=False)
    test_set = CIFAR10(root, train=False, transform=preprocess, download=False)
    train_idx = json.load(open(indices_file))["indices"]
    chosen = set(train_idx)
    val_idx = [i for i in range(len(train_set)) if i not in chosen][:500]
    loader = lambda idx, shuffle, batch: torch.utils.data.DataLoader(
        torch.utils.data.Subset(train_set, idx), batch_size=batch, shuffle=shuffle)
    train_loader, val_loader = loader(train_idx, True, 128), loader(val_idx, False, 512)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=512)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)

    def accuracy(data):
        head.eval()
        right = total = 0
        with torch.no_grad():
            for images, labels in data:
                right += (head(backbone(images)).argmax(1) == labels).sum().item()
                total += len(labels)
        return right / total

    started = time.perf_counter()
    for epoch in range(epochs):
        head.train()
        for images, labels in train_loader:
            with torch.no_grad():
                features = backbone(images)
            loss = nn.functional.cross_entropy(head(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        val = accuracy(val_loader)
    trained = time.perf_counter() - started
    test = accuracy(test_loader)
    print(json.dumps({"val_acc": val, "test_acc": test, "train_s": trained}))
    """
)


def stand_in_weights(torch_home: Path) -> Path:
    """Random resnet18 weights where torchvision looks for its ImageNet ones."""
    import torch
    import torchvision

    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    path = torch_home / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def log_time(line: str) -> float:
    stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", line).group(1)
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run_transferlab(root: str, per_class: int, epochs: int, work: Path, env: dict) -> dict:
    run_dir = work / "run"
    command = [
        sys.executable, "-m", "transferlab", "experiment=vgg_frozen", "backbone=resnet18", "head=mlp",
        "data.val_size=500", "data.augment=false", f"trainer.max_epochs={epochs}",
        f"data.fewshot.per_class={per_class}", f"data.root={root}", "data.download=false",
        "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    started_wall, started = time.time(), time.perf_counter()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    total = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"transferlab exited {done.returncode}:\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    seed_line = next(x for x in (run_dir / "train.log").read_text().splitlines() if "] - seed: " in x)
    startup = log_time(seed_line) - started_wall
    features, train = metrics["features_time_s"], metrics["train_time_s"]
    return {
        "total": total,
        "startup": startup,
        "features": features,
        "epochs": train,
        "rest": total - startup - features - train,
        "val": metrics["val/acc_best"],
        "test": metrics["test/acc"],
        "indices": run_dir / "fewshot_indices.json",
    }


def run_naive(root: str, indices: Path, epochs: int, weights: Path, work: Path, env: dict) -> dict:
    script = work / "naive.py"
    script.write_text(NAIVE)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(script), root, str(indices), str(epochs), str(weights)],
        cwd=work, env=env, capture_output=True, text=True,
    )  # fmt: skip
    total = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the naive loop exited {done.returncode}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"total": total, "val": result["val_acc"], "test": result["test_acc"], "train": result["train_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="the folder that holds cifar-10-batches-py")
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    print(cpu(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = stand_in_weights(work / "torch_home")
        env = dict(os.environ, TORCH_HOME=str(work / "torch_home"), TRANSFERLAB_CACHE=str(work / "cache"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        ours = run_transferlab(args.root, args.per_class, args.epochs, work, env)
        naive = run_naive(args.root, ours["indices"], args.epochs, weights, work, env)
    print(
        f"\n{args.per_class} images per class, resnet18 32 px, mlp head, {args.epochs} epochs, cold feature cache\n"
    )
    print(
        "| path | whole process (s) | start-up (s) | features (s) | head epochs (s) | test + writing (s) | val acc | test acc |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| transferlab | {ours['total']:.1f} | {ours['startup']:.2f} | {ours['features']:.2f} | "
        f"{ours['epochs']:.2f} | {ours['rest']:.2f} | {ours['val']:.3f} | {ours['test']:.3f} |"
    )
    print(
        f"| naive loop | {naive['total']:.1f} | | | {naive['train']:.1f} (epochs with features) | | {naive['val']:.3f} | {naive['test']:.3f} |"
    )
    print(f"\nnaive / transferlab: {naive['total'] / ours['total']:.1f}x (goal: at least 7x)")


if __name__ == "__main__":
    main()
