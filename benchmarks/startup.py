"""Start-up times of the command line (issue 22, item 2), as whole processes.

    python benchmarks/startup.py --root /path/to/cifar [--reps 5]

Rows, each the median of --reps counted runs after one warm-up, the commands alternating within
each repetition (so a slower moment of a shared machine costs every row alike):
- `python -c "import torch"`: the yardstick (goal: every refusal decided from the command line
  and the composed config alone within 1.5x of it);
- `python -m transferlab --help`;
- a mistyped key (`optimizer.lrr=0.1`), a value of the wrong type (`trainer.max_epochs=ten`), a
  budget that trains nothing (`trainer.max_epochs=0`): one line, exit 2;
- a meaningless combination (`mode=linear_probe head=mlp`): one line, exit 2;
- a run's start-up: process start to its `seed:` log line (goal: at most 2.5 s), the process
  killed there (nothing after it is timed; the run dir is a temporary folder).

Prints the CPU model and flags first. Run it alone: two timed things at once time neither.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu() -> str:
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"


def timed(command: list[str], cwd: Path, expect_rc: int | None) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if expect_rc is not None and done.returncode != expect_rc:
        sys.exit(f"{' '.join(command)} exited {done.returncode}, not {expect_rc}:\n{done.stderr[-2000:]}")
    return elapsed


def until_seed_line(command: list[str], cwd: Path) -> float:
    """Seconds from process start to the run's `seed:` line; the process is killed there."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        for line in process.stdout:
            if "] - seed: " in line:
                return time.perf_counter() - started
        sys.exit(f"{' '.join(command)} ended (exit {process.wait()}) without a seed: line")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, type=Path, help="folder that holds cifar-10-batches-py/")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tl-startup-"))  # outside the checkout: no git, no outputs/
    tl = [sys.executable, "-m", "transferlab"]
    data = [f"data.root={args.root.resolve()}", "data.download=false"]
    rows = {
        'python -c "import torch"': (lambda: timed([sys.executable, "-c", "import torch"], work, 0)),
        "python -m transferlab --help": (lambda: timed([*tl, "--help"], work, 0)),
        "mistyped key (optimizer.lrr=0.1)": (lambda: timed([*tl, "optimizer.lrr=0.1"], work, 2)),
        "wrong type (trainer.max_epochs=ten)": (lambda: timed([*tl, "trainer.max_epochs=ten"], work, 2)),
        "budget (trainer.max_epochs=0)": (lambda: timed([*tl, "trainer.max_epochs=0"], work, 2)),
        "combination (mode=linear_probe head=mlp)": (
            lambda: timed([*tl, "mode=linear_probe", "head=mlp", *data], work, 2)
        ),
    }
    run = 0

    def start_up() -> float:
        nonlocal run
        run += 1
        return until_seed_line(
            [
                *tl,
                "backbone=cnn_small",
                *data,
                f"hydra.run.dir={work / f'run{run}'}",
                "callbacks.progress_bar=null",
            ],
            work,
        )

    rows["a run: process start to its seed: line (cnn_small)"] = start_up
    env_note = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    print(f"CPU: {cpu()}; python {platform.python_version()}; {env_note}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for rep in range(args.reps + 1):  # the first repetition warms the file caches: not counted
        for name, measure in rows.items():
            elapsed = measure()
            if rep:
                times[name].append(elapsed)
        print(f"repetition {rep}{' (warm-up)' if rep == 0 else ''} done", flush=True)
    torch_s = statistics.median(times['python -c "import torch"'])
    print(f"\n| command | median (s) | min-max (s) | vs import torch ({torch_s:.2f} s) |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {min(values):.2f}-{max(values):.2f} | {median / torch_s:.2f}x |")


if __name__ == "__main__":
    main()
