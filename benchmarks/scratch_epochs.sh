#!/usr/bin/env bash
# Issue 19: scratch's trainer.max_epochs, the smallest E at which doubling it gains under 0.5
# validation points (val/acc_best), and no longer run measured gains more, at 50 images per class, 64 px, seed 0, with the recipe chosen
# by benchmarks/recipe_sweep.sh for lite0_scratch (augmentation, label smoothing 0.1,
# warmup_cosine, AdamW, one rate).
#
#   benchmarks/scratch_epochs.sh /path/to/cifar [OUT] [EPOCHS...]   # default 16 32 64 128
#
# Each E is its own run (a cosine schedule over E epochs is not the first E epochs of a longer
# one); runs already in OUT are kept. About 7 s an epoch on one CPU thread.
set -euo pipefail
root=${1:?give the folder that holds cifar-10-batches-py}
out=${2:-outputs/scratch_epochs}
shift $(( $# >= 2 ? 2 : 1 ))
epochs=("$@")
[ ${#epochs[@]} -gt 0 ] || epochs=(16 32 64 128)
for e in "${epochs[@]}"; do
    [ -f "$out/epochs$e/metrics.json" ] && continue
    python -m transferlab experiment=lite0_scratch data.fewshot.per_class=50 seed=0 test=true \
        data.root="$root" data.download=false data.augment=true model.label_smoothing=0.1 \
        scheduler=warmup_cosine optimizer.lr=1e-2 trainer.max_epochs="$e" hydra.run.dir="$out/epochs$e"
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
runs = {}
for m in Path(sys.argv[1]).glob("epochs*/metrics.json"):
    runs[int(m.parent.name.removeprefix("epochs"))] = json.loads(m.read_text())["val/acc_best"]
print("| trainer.max_epochs | val/acc_best (%) | gain from doubling (points) |")
print("|---|---|---|")
for e in sorted(runs):
    gain = f"{100 * (runs[2 * e] - runs[e]):+.1f}" if 2 * e in runs else "-"
    print(f"| {e} | {100 * runs[e]:.1f} | {gain} |")
# the smallest E that no measured longer run beats by 0.5 points or more (a single doubling can
# gain little by chance on 500 validation images and a longer run still be far ahead)
done = [e for e in sorted(runs) if any(2 * e == f for f in runs) and all(runs[f] - runs[e] < 0.005 for f in runs if f > e)]
print(f"\nchosen: {done[0]} epochs (no longer run measured gains 0.5 points)" if done else "\nno E yet that every longer run (one doubling at least) beats by under 0.5 points: run longer")
PY
