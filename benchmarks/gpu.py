"""GPU throughput with AMP (bf16) and channels-last, torch.compile on and off (issue 22, item 5).

    python benchmarks/gpu.py [--cap 40] [--device cuda]

Self-contained on purpose: a GPU machine may have torch, torchvision, timm and lightning but
neither hydra nor CIFAR, so nothing here imports transferlab and every input is a synthetic
tensor. Rows:
- EfficientNet-Lite0 (timm's `tf_efficientnet_lite0`) at 224 px in the three modes: frozen (the
  backbone in eval mode under inference_mode, a linear head trained on its features), finetune
  (the whole network trained) and scratch (the same from random init: the same arithmetic);
- ResNet18 at 224 px, frozen extraction (inference_mode forward);
- torch.compile off and on for lite0 finetune and the ResNet18 extraction.
Every row runs under `torch.autocast(device, torch.bfloat16)` with channels-last inputs and
weights, warms up (compilation included), then times steps until --cap seconds; it prints img/s
(median step) and the peak memory the device allocated. Whole script: at most about 6 minutes
(6 rows at --cap 40, plus warm-up and compilation).
"""

from __future__ import annotations

import argparse
import statistics
import time


def network(name: str):
    import timm
    import torch
    import torchvision

    if name == "lite0":
        return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.num_features = 512
    return model


def row(label: str, make_step, batch: int, device: str, cap: float, warmup: int) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        step = make_step()
        started = time.perf_counter()
        for _ in range(warmup):
            step()
        warm_s = time.perf_counter() - started
        times = []
        while sum(times) < cap or len(times) < 3:
            t = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            if len(times) >= 200:
                break
    except Exception as error:  # one row failing (e.g. compile on an old driver) leaves the others
        print(f"| {label} | failed: {type(error).__name__}: {str(error)[:120]} | | | |", flush=True)
        return
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    print(
        f"| {label} | {batch / statistics.median(times):,.0f} | {peak:.2f} | {warm_s:.1f} | {len(times)} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cap", type=float, default=40.0, help="timed seconds per row (default 40)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps per row (default 10)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to check the script")
    args = parser.parse_args()
    import torch
    from torch import nn

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this benchmark is unmeasured on this machine (see RESULTS.md)")
    device, batch, size = args.device, args.batch, args.size
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, batch {batch}, {size} px, bf16 autocast, channels-last")
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    amp = lambda: torch.autocast(device, dtype=torch.bfloat16)  # noqa: E731

    def prepared(which: str, compiled: bool):
        net = network(which).to(device).to(memory_format=torch.channels_last)
        return (torch.compile(net) if compiled else net), net

    def frozen(which: str, compiled: bool = False, head_too: bool = True):
        def make():
            net, plain = prepared(which, compiled)
            plain.eval()
            head = nn.Linear(plain.num_features, 10).to(device)
            optimizer = torch.optim.SGD(head.parameters(), lr=1e-3)

            def step():
                with torch.inference_mode(), amp():
                    features = net(images).float()
                if head_too:
                    with amp():
                        loss = nn.functional.cross_entropy(head(features.clone()), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

            return step

        return make

    def trained(which: str, compiled: bool = False):
        def make():
            net, plain = prepared(which, compiled)
            plain.train()
            head = nn.Linear(plain.num_features, 10).to(device)
            optimizer = torch.optim.SGD([*plain.parameters(), *head.parameters()], lr=1e-3, momentum=0.9)

            def step():
                with amp():
                    loss = nn.functional.cross_entropy(head(net(images)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            return step

        return make

    print("\n| row | img/s | peak memory (GiB) | warm-up (s) | timed steps |")
    print("|---|---|---|---|---|")
    cap, warmup = args.cap, args.warmup
    row("lite0 frozen (extraction + head step)", frozen("lite0"), batch, device, cap, warmup)
    row("lite0 finetune", trained("lite0"), batch, device, cap, warmup)
    row("lite0 scratch (random init: finetune's arithmetic)", trained("lite0"), batch, device, cap, warmup)
    row("resnet18 frozen extraction", frozen("resnet18", head_too=False), batch, device, cap, warmup)
    row("lite0 finetune, torch.compile", trained("lite0", compiled=True), batch, device, cap, warmup)
    row(
        "resnet18 frozen extraction, torch.compile",
        frozen("resnet18", compiled=True, head_too=False),
        batch,
        device,
        cap,
        warmup,
    )


if __name__ == "__main__":
    main()
