"""The README's robustness table from benchmarks/robustness_study.sh's runs: per arm, the mean and
standard deviation over the seeds of clean test accuracy, ECE before and after temperature scaling,
and the mean corruption accuracy, with LP-FT's and finetune's paired differences to the linear probe.

    python benchmarks/robustness_table.py OUT        # OUT: the study's folder (outputs/robustness)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

# arm -> the study's part and how its run dirs are told apart
ARMS = [
    ("linear probe", "probes", "mode=linear_probe"),
    ("kNN", "probes", "mode=knn"),
    ("NCM", "probes", "mode=ncm"),
    ("frozen (head trained 30 epochs)", "frozen", ""),
    ("finetune", "finetune", ""),
    ("LP-FT", "lp_ft", ""),
    ("WiSE-FT (LP-FT's probe state to its last epoch, alpha on val)", "wise", ""),
]
COLUMNS = [
    ("test/acc", "test acc (%)", 100),
    ("test/ece", "ECE (%)", 100),
    ("test/ece_calibrated", "ECE after T (%)", 100),
    ("test_c/acc", "corrupted acc (%)", 100),
    ("test_c/clean_acc", "same 2,000 clean (%)", 100),
]


def runs(out: Path, part: str, tag: str) -> dict[str, dict]:
    """seed -> metrics.json of the arm's runs (run dir names hold seed=S)."""
    found = {}
    for folder in sorted((out / part).glob("[0-9]*")):
        if tag and tag not in folder.name:
            continue
        seed = folder.name.split("seed=")[1].split(",")[0]
        if not (folder / "metrics.json").is_file():
            sys.exit(f"{folder} has no metrics.json (not finished?); rerun its part of robustness_study.sh")
        found[seed] = json.loads((folder / "metrics.json").read_text())
    return found


def cell(values: list[float], scale: float) -> str:
    if len(values) < 2:
        return "n/a"
    return f"{statistics.mean(values) * scale:.1f} ± {statistics.stdev(values) * scale:.1f}"


def main(out: Path) -> None:
    table = {name: runs(out, part, tag) for name, part, tag in ARMS}
    print("| arm | seeds | " + " | ".join(c[1] for c in COLUMNS) + " | alpha |")
    print("|---|---|" + "---|" * len(COLUMNS) + "---|")
    for name, metrics in table.items():
        cells = [cell([m[k] for m in metrics.values() if k in m], s) for k, _, s in COLUMNS]
        alphas = ", ".join(f"{m['alpha']:g}" for m in metrics.values() if "alpha" in m) or ""
        print(f"| {name} | {len(metrics)} | " + " | ".join(cells) + f" | {alphas} |")
    probe = table["linear probe"]
    print()
    print("Paired differences to the linear probe (same seed: same training images), mean ± std, points:")
    for name in ("finetune", "LP-FT", ARMS[-1][0]):
        for key, label in (("test/acc", "clean"), ("test_c/acc", "corrupted")):
            diffs = [(table[name][s][key] - probe[s][key]) * 100 for s in probe if s in table[name]]
            print(f"- {name}, {label}: {statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs):.1f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/robustness"))
