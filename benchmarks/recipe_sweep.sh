#!/usr/bin/env bash
# Issue 19's recipe sweep for the lite0 arm that fine-tunes: EfficientNet-Lite0 (real ImageNet
# weights), 50 images per class, 64 px, seed 0, the choice made on validation (val/acc_best).
#
#   benchmarks/recipe_sweep.sh /path/to/cifar [OUT]     # OUT: outputs/recipe_sweep
#
# The grid: the preset as it is (AdamW, head 3e-3 / backbone 3e-4, no augmentation, cosine), and
# with the stronger recipe (data.augment=true, model.label_smoothing=0.1, scheduler=warmup_cosine)
# AdamW at lr 1e-3 and 3e-3 with model.backbone_lr_ratio 0.1 and 1.0, and SGD with Nesterov momentum
# at 0.01 and 0.03 (ratio 1.0): 7 runs of 8 epochs, about 2 minutes each on one CPU thread.
# Prints the report's selected.md (the chosen setting; no test number takes part in the choice).
set -euo pipefail
root=${1:?give the folder that holds cifar-10-batches-py}
out=${2:-outputs/recipe_sweep}
data="experiment=lite0_finetune data.fewshot.per_class=50 seed=0 data.root=$root data.download=false"
recipe="data.augment=true model.label_smoothing=0.1 scheduler=warmup_cosine"
python -m transferlab -m $data $recipe optimizer=adamw optimizer.lr=1e-3,3e-3 model.backbone_lr_ratio=0.1,1.0 \
    hydra.sweep.dir="$out/adamw"
python -m transferlab -m $data $recipe optimizer=sgd optimizer.nesterov=true optimizer.lr=0.01,0.03 \
    model.backbone_lr_ratio=1.0 hydra.sweep.dir="$out/sgd"
python -m transferlab -m $data hydra.sweep.dir="$out/preset"
python -m transferlab.report "$out" --select-by val/acc_best --per experiment --out "$out/report"
cat "$out/report/selected.md"
