"""fp32 against bf16-mixed on this machine (issue 22, item 3).

    python benchmarks/precision.py                      # speed: training and extraction img/s
    python benchmarks/precision.py --accuracy --root /path/to/cifar [--seeds 0 1 2]

Speed, on synthetic tensors, channels-last in both precisions, the machine's threads: for
EfficientNet-Lite0 at 64 and 96 px, ResNet18 at 32 and 224 px and VGG11_bn at 32 px (random
weights: speed does not depend on them), a training step (forward, cross-entropy, backward, SGD
step of the whole network and a linear head) and an extraction step (inference_mode forward), in
fp32 and under `torch.autocast("cpu", torch.bfloat16)` (what Lightning's bf16-mixed does). oneDNN
builds kernels per shape on first use, so each row first runs warm-up steps; the table gives how
many steps it took until a step's time was within 1.25x of the steady (median) time after it, and
the img/s after warm-up (median of the timed steps). Each row stops after --cap seconds.

Accuracy (--accuracy): `experiment=lite0_frozen` and `experiment=lite0_finetune` with the real
ImageNet weights (the `weights` extra), 50 images per class, each seed in `trainer.precision=32-true`
and `bf16-mixed`, on all 10,000 test images; the paired difference bf16 - fp32 per seed, its mean,
std and 95% t-interval. Run it alone (two trainings at once make every figure meaningless).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from startup import cpu  # noqa: E402  (the CPU line every benchmark prints)

#: (backbone, image size, batch)
ROWS = [
    ("efficientnet_lite0", 64, 32),
    ("efficientnet_lite0", 96, 32),
    ("resnet18", 32, 64),
    ("resnet18", 224, 16),
    ("vgg11_bn", 32, 64),
]


def backbone(name: str, size: int):
    from transferlab.models import torchvision_backbone
    from transferlab.models.timm_backbones import efficientnet_lite

    if name.startswith("efficientnet_"):
        return efficientnet_lite(name.removeprefix("efficientnet_"), weights="none", image_size=size)
    return torchvision_backbone(name, weights="none", image_size=size)


def autocast(bf16: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def timed_steps(step, warmup: int, steps: int, cap: float) -> tuple[list[float], list[float]]:
    """Each warm-up step's and timed step's seconds; stops at `cap` seconds in all."""
    started = time.perf_counter()
    warm, timed = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        step()
        (warm if i < warmup else timed).append(time.perf_counter() - t)
        if time.perf_counter() - started > cap and len(timed) >= 3:
            break
    return warm, timed


def warmup_needed(warm: list[float], steady: float) -> int:
    """Steps until one ran within 1.25x of the steady time (all warm-up steps if none did)."""
    return next((i for i, s in enumerate(warm) if s <= 1.25 * steady), len(warm))


def measure(name: str, size: int, batch: int, bf16: bool, train: bool, args) -> tuple[float, int]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = backbone(name, size).to(memory_format=torch.channels_last)
    head = nn.Linear(net.out_features, 10)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))
    if train:
        net.train()
        optimizer = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=1e-3, momentum=0.9)

        def step():
            with autocast(bf16):
                loss = nn.functional.cross_entropy(head(net(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    else:
        net.eval()

        def step():
            with torch.inference_mode(), autocast(bf16):
                net(images).float()

    warm, timed = timed_steps(step, args.warmup, args.steps, args.cap)
    steady = statistics.median(timed)
    return batch / steady, warmup_needed(warm, steady)


def speed(args) -> None:
    print(
        "\n| backbone | size | batch | what | fp32 img/s | bf16 img/s | bf16 / fp32 | warm-up steps fp32 / bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, size, batch in ROWS:
        for train in (True, False):
            fp32, warm32 = measure(name, size, batch, False, train, args)
            bf16, warm16 = measure(name, size, batch, True, train, args)
            what = "training" if train else "extraction"
            print(
                f"| {name} | {size} | {batch} | {what} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f} | "
                f"{warm32} / {warm16} |",
                flush=True,
            )


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean, std and the half-width of the 95% t-interval."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    std = statistics.stdev(values)
    return mean, std, stats.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))


def accuracy(args) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="precision-"))
    print(f"\nruns in {out}")
    print("\n| preset | seed | fp32 test acc | bf16 test acc | bf16 - fp32 (points) | fp32 / bf16 run (s) |")
    print("|---|---|---|---|---|---|")
    for preset in ("lite0_frozen", "lite0_finetune"):
        differences = []
        for seed in args.seeds:
            results = {}
            for precision in ("32-true", "bf16-mixed"):
                run_dir = out / preset / f"seed{seed}-{precision}"
                if not (run_dir / "metrics.json").is_file():
                    started = time.perf_counter()
                    command = [
                        sys.executable, "-m", "transferlab", f"experiment={preset}", "data.fewshot.per_class=50",
                        f"seed={seed}", f"trainer.precision={precision}", f"data.root={args.root}",
                        "data.download=false", "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}",
                    ]  # fmt: skip
                    done = subprocess.run(command, env=env, capture_output=True, text=True)
                    if done.returncode != 0:
                        sys.exit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
                    (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
                metrics = json.loads((run_dir / "metrics.json").read_text())
                wall = (
                    (run_dir / "wall_s.txt").read_text().strip()
                    if (run_dir / "wall_s.txt").is_file()
                    else "?"
                )
                results[precision] = (metrics["test/acc"], wall)
            (fp32, wall32), (bf16, wall16) = results["32-true"], results["bf16-mixed"]
            differences.append(100 * (bf16 - fp32))
            print(
                f"| {preset} | {seed} | {100 * fp32:.2f} | {100 * bf16:.2f} | {100 * (bf16 - fp32):+.2f} | "
                f"{wall32} / {wall16} |",
                flush=True,
            )
        mean, std, half = t_interval(differences)
        print(
            f"| {preset} | mean | | | {mean:+.2f} ± {std:.2f} (95% CI {mean - half:+.2f} to {mean + half:+.2f}) | |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warmup", type=int, default=8, help="warm-up steps per row (default 8)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds per row at most (default 60)")
    parser.add_argument("--accuracy", action="store_true", help="the paired accuracy runs instead of speed")
    parser.add_argument("--root", help="the folder that holds cifar-10-batches-py (--accuracy)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", help="where the accuracy runs go (kept; runs already there are reused)")
    args = parser.parse_args()
    import torch

    flags = cpu()
    print(flags)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "amx_bf16" not in flags:
        print("no AMX on this CPU: bf16 runs on what it has (AVX-512-bf16 where listed, else emulated)")
    if args.accuracy:
        if not args.root:
            parser.error("--accuracy needs --root")
        accuracy(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
