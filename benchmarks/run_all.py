"""transferlab's speed and memory benchmarks, one table.

    python benchmarks/run_all.py --root /path/to/cifar      # holds cifar-10-batches-py/

1. frozen ResNet18, 32 px, CIFAR-10: wall time of a whole run with cached features vs without
2. training throughput (images/s) of mode=finetune: transferlab's Trainer.fit vs a bare loop
3. inference throughput per backbone at 32 and 224 px
4. peak RSS of a full CIFAR-10 frozen run
5. GPU: moved to benchmarks/gpu.py (self-contained: AMP bf16, channels-last, torch.compile on and off)

Every figure is the median of --reps repetitions. Random weights stand in for ImageNet
weights: speed does not depend on the values. Not part of the unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS: list[tuple[str, str, str]] = []


def row(name: str, value: str, note: str = "") -> None:
    ROWS.append((name, value, note))
    print(f"  {name}: {value} {note}", flush=True)


# ---- 1 and 4: whole runs through the command line ------------------------------------------------
def run_cli(overrides: list[str], cache_dir: Path) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS in GB, metrics.json) of one `python -m transferlab` run."""
    out = Path(tempfile.mkdtemp(prefix="tl-bench-"))
    env = dict(os.environ, TRANSFERLAB_CACHE=str(cache_dir), PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "transferlab",
        *overrides,
        f"hydra.run.dir={out}",
        "callbacks.progress_bar=null",
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024**2, json.loads((out / "metrics.json").read_text())


def bench_cached_frozen(root: str, epochs: int, reps: int, fraction: float) -> None:
    base = [
        "backbone=resnet18",
        "backbone.weights=none",
        "mode=frozen",
        "head=linear",
        f"data.root={root}",
        "data.download=false",
        "data.normalization=imagenet",
        f"trainer.max_epochs={epochs}",
    ]
    if fraction < 1.0:  # a stratified share of the training set; validation and test stay whole
        base.append(f"data.fewshot.fraction={fraction}")
    results = {}
    for label, setting in (("cached", "true"), ("uncached", "false")):
        walls, rss = [], []
        for _ in range(reps):  # a cold cache every time: the features are computed in the run
            wall, peak, _ = run_cli([*base, f"data.cache_features={setting}"], Path(tempfile.mkdtemp()))
            walls.append(wall)
            rss.append(peak)
        results[label] = (statistics.median(walls), statistics.median(rss))
    share = "" if fraction == 1.0 else f", {fraction:.0%} of the training images"
    row(f"1. frozen resnet18 32px, {epochs} epochs{share}: cached run (s)", f"{results['cached'][0]:.1f}")
    row(f"1. frozen resnet18 32px, {epochs} epochs{share}: uncached run (s)", f"{results['uncached'][0]:.1f}")
    row(
        "1. speed-up of the cached path",
        f"{results['uncached'][0] / results['cached'][0]:.2f}x",
        "(target >= 5x)",
    )
    row("4. peak RSS, frozen resnet18 run, cached (GB)", f"{results['cached'][1]:.2f}", "(target < 3 GB)")
    row("4. peak RSS, frozen resnet18 run, uncached (GB)", f"{results['uncached'][1]:.2f}", "(target < 3 GB)")


# ---- 2: Lightning loop vs a bare loop ----------------------------------------------------------
def build(root: str, backbone: str, batch_size: int):
    """The real config's data + model for mode=finetune (random weights)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from transferlab.config import config_dir

    overrides = [
        f"backbone={backbone}",
        "backbone.weights=none",
        "mode=finetune",
        f"data.root={root}",
        "data.download=false",
        f"data.batch_size={batch_size}",
        "data.augment=true",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp()
    return cfg


def make_model(cfg, datamodule):
    """The model `python -m transferlab` trains for `cfg` (transferlab.build: same rules, e.g. scratch = random init)."""
    from transferlab.build import build_backbone, build_model

    torch.manual_seed(0)
    return build_model(cfg, build_backbone(cfg), datamodule)


def bare_loop_rate(model, datamodule, steps: int, warmup: int) -> float:
    import torch.nn.functional as F

    optimizer = model.configure_optimizers()
    model.train()
    seen, started = 0, None
    for i, (images, labels) in enumerate(datamodule.train_dataloader()):
        if i == warmup:
            started, seen = time.perf_counter(), 0
        if i == warmup + steps:
            break
        inputs = datamodule.preprocess(images, train=True)
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - started)


def lightning_rate(cfg, model, datamodule, steps: int, warmup: int) -> float:
    import hydra
    import lightning as L

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == warmup:
                self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == warmup + steps - 1:
                self.elapsed = time.perf_counter() - self.started

    clock = Clock()
    # transferlab's own callbacks and logger as configured, minus the epoch-end checkpoint write.
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c]
    callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ModelCheckpoint)]
    logger = hydra.utils.instantiate(cfg.logger.tensorboard)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=logger,
        callbacks=[*callbacks, clock],
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    return steps * datamodule.batch_size / clock.elapsed


def bench_loop_overhead(root: str, reps: int, steps: int) -> None:
    for backbone in ("resnet18", "vgg11_bn"):
        cfg = build(root, backbone, batch_size=128)
        datamodule = _datamodule(cfg)
        bare, ours = [], []
        for _ in range(reps):  # interleaved, so drift in machine speed hits both alike
            model = make_model(cfg, datamodule)
            torch.manual_seed(0)
            bare.append(bare_loop_rate(model, datamodule, steps, warmup=3))
            model = make_model(cfg, datamodule)
            torch.manual_seed(0)
            ours.append(lightning_rate(cfg, model, datamodule, steps, warmup=3))
        b, o = statistics.median(bare), statistics.median(ours)
        row(f"2. finetune {backbone} 32px: bare loop (img/s)", f"{b:.0f}")
        row(f"2. finetune {backbone} 32px: transferlab Trainer.fit (img/s)", f"{o:.0f}")
        row(f"2. {backbone}: Trainer.fit / bare loop", f"{o / b:.3f}", "(target >= 0.9)")


def _datamodule(cfg):
    from transferlab.build import build_backbone, build_datamodule

    return build_datamodule(cfg, build_backbone(cfg), Path(cfg.paths.output_dir))


# ---- 3: inference throughput ----------------------------------------------------------------------
@torch.inference_mode()
def bench_inference(reps: int) -> None:
    from transferlab.models import cnn_small, torchvision_backbone

    for name in ("cnn_small", "resnet18", "vgg11_bn", "resnet50"):
        for size, batch, batches in ((32, 256, 4), (224, 16, 2)):
            if name == "cnn_small" and size == 224:
                continue
            model = (
                cnn_small(image_size=size)
                if name == "cnn_small"
                else torchvision_backbone(name, weights="none", image_size=size)
            )
            model.eval()
            x = torch.randn(batch, 3, size, size)
            model(x)  # warm-up
            rates = []
            for _ in range(reps):
                started = time.perf_counter()
                for _ in range(batches):
                    model(x)
                rates.append(batch * batches / (time.perf_counter() - started))
            row(f"3. inference {name} {size}px (img/s)", f"{statistics.median(rates):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--frozen-epochs", type=int, default=10)
    parser.add_argument(
        "--frozen-train-fraction",
        type=float,
        default=1.0,
        help="share of the training images in benchmark 1 (data.fewshot.fraction)",
    )
    parser.add_argument(
        "--loop-steps", type=int, default=20, help="timed training steps per repetition in benchmark 2"
    )
    parser.add_argument("--only", default="1,2,3,5", help="which benchmarks (4 comes with 1)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(
        f"# transferlab benchmarks: torch {torch.__version__}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads, cuda={torch.cuda.is_available()}, median of {args.reps}",
        flush=True,
    )
    if "1" in only:
        bench_cached_frozen(args.root, args.frozen_epochs, args.reps, args.frozen_train_fraction)
    if "2" in only:
        bench_loop_overhead(args.root, args.reps, args.loop_steps)
    if "3" in only:
        bench_inference(args.reps)
    if "5" in only:
        row("5. GPU", "see benchmarks/gpu.py", "(python benchmarks/gpu.py on a machine with a CUDA device)")
    print()
    print("| benchmark | result | |")
    print("|---|---|---|")
    for name, value, note in ROWS:
        print(f"| {name} | {value} | {note} |")


if __name__ == "__main__":
    main()
