"""Feature extraction with the real EfficientNet-Lite0 weights: transferlab vs a plain timm loop.

    python benchmarks/lite0_features.py --root /path/to/cifar --images 2048 --sizes 96 224

For each image size, over the same uint8 CIFAR-10 test images, same threads, same batch:
- transferlab: the backbone and data module the training command builds (config
  `experiment=lite0_frozen`), through `transferlab.data.features.extract_features` (the cached-
  features path of mode=frozen: eval mode, inference_mode, channels_last);
- plain timm: `timm.create_model("tf_efficientnet_lite0", num_classes=0)` with the same weights,
  a `torch.no_grad()` loop doing /255, normalize, bilinear resize, forward, in the default layout.
Each figure is the median of --reps passes; the ratio is transferlab / plain (goal >= 1.0).
The last column is the share of this machine's measured fp32 matmul throughput that the
forward pass reaches (the model's FLOPs counted by torch's FlopCounterMode).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def matmul_gflops(size: int = 2048, reps: int = 10) -> float:
    """Peak-ish fp32 GEMM throughput of this machine at the current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times) / 1e9


def model_gflops(model: torch.nn.Module, size: int) -> float:
    """Forward FLOPs of one image (multiply and add counted as two)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def transferlab_path(root: str, size: int, batch: int):
    """The backbone and data module exactly as `python -m transferlab experiment=lite0_frozen` builds them."""
    from conftest import compose_config

    from transferlab.build import build

    overrides = [
        "experiment=lite0_frozen",
        f"data.root={root}",
        "data.download=false",
        f"data.image_size={size}",
        f"data.eval_batch_size={batch}",
        "data.cache_features=false",
    ]  # the images, not cached features
    built = build(compose_config(overrides, Path("/tmp/tl-bench-lite0")), with_trainer=False)
    return built.model.backbone, built.datamodule


def plain_timm_loop(images: torch.Tensor, size: int, batch: int, state: dict) -> float:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    model.load_state_dict(state)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = (images[start : start + batch].float() / 255 - mean) / std
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            model(x)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="folder that holds cifar-10-batches-py/")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from transferlab.data.features import extract_features
    from transferlab.data.subsets import Split

    gemm = matmul_gflops()
    print(
        f"threads {torch.get_num_threads()}, batch {args.batch}, {args.images} images, fp32 matmul {gemm:.0f} GFLOP/s\n"
    )
    print("| size | transferlab (img/s) | plain timm (img/s) | ratio | GFLOP/img | share of matmul peak |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        backbone, datamodule = transferlab_path(args.root, size, args.batch)
        test = datamodule.test
        images = test.images[: args.images]
        split = Split(images, test.labels[: args.images], test.positions[: args.images])
        state = {k[len("body.") :]: v.contiguous() for k, v in backbone.state_dict().items()}
        ours, plain = [], []
        for _ in range(args.reps):  # alternate, so drift in machine load hits both alike
            started = time.perf_counter()
            extract_features(backbone, datamodule, split, "cpu")
            ours.append(len(images) / (time.perf_counter() - started))
            plain.append(plain_timm_loop(images, size, args.batch, state))
        ours_s, plain_s = statistics.median(ours), statistics.median(plain)
        flops = model_gflops(backbone.eval(), size)
        share = ours_s * flops / gemm
        print(
            f"| {size} | {ours_s:.0f} | {plain_s:.0f} | {ours_s / plain_s:.2f} | {flops:.3f} | {share:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
