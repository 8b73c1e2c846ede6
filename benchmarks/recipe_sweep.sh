#!/usr/bin/env bash
# Issue 19's recipe sweep: each lite0 arm tuned on validation (val/acc_best) before the fair study.
# EfficientNet-Lite0 with its real ImageNet weights, 50 images per class, 64 px, seed 0; no test
# number takes part in the choice (the report's --select-by reads val/acc_best only).
#
#   benchmarks/recipe_sweep.sh /path/to/cifar [OUT] [ARM...]   # OUT: outputs/recipe_sweep
#
# ARM: frozen, finetune, lp_ft, scratch (default: all four, one after the other). The arms write
# into one parent dir, so two shells can each run some of them; the last line of each call prints
# the choice over everything OUT holds so far.
#
# The grids (the "recipe": data.augment=true model.label_smoothing=0.1 scheduler=warmup_cosine):
#   frozen    the preset (no augmentation: its features are cached) at head lr 1e-3, 3e-3, 1e-2, 3e-2
#   finetune  the preset as it is (AdamW, head 3e-3 / backbone 3e-4, cosine, no augmentation); the
#             recipe with AdamW at lr 1e-3, 3e-3, 1e-2 (one rate for head and backbone) and at 3e-3 with
#             the backbone at a tenth; the recipe with SGD + Nesterov at 0.01
#   lp_ft     the preset as it is (AdamW 3e-4, cosine, no augmentation); the recipe at 3e-4, 1e-3, 3e-3
#   scratch   the preset as it is (8 epochs); the recipe at lr 3e-3, 1e-2 and 3e-2, 16 epochs
# On one CPU thread (OMP_NUM_THREADS=1) a fine-tuning run of 8 epochs takes about 2 minutes.
# Scratch's epochs are chosen afterwards by doubling (benchmarks/scratch_epochs.sh).
set -euo pipefail
root=${1:?give the folder that holds cifar-10-batches-py}
out=${2:-outputs/recipe_sweep}
shift $(( $# >= 2 ? 2 : 1 ))
arms=("$@")
[ ${#arms[@]} -gt 0 ] || arms=(frozen finetune lp_ft scratch)
data="data.fewshot.per_class=50 seed=0 test=true data.root=$root data.download=false"
recipe="data.augment=true model.label_smoothing=0.1 scheduler=warmup_cosine"
sweep() { python -m transferlab -m "$@"; }
for arm in "${arms[@]}"; do
    case $arm in
    frozen)
        sweep experiment=lite0_frozen $data optimizer.lr=1e-3,3e-3,1e-2,3e-2 hydra.sweep.dir="$out/frozen" ;;
    finetune)
        sweep experiment=lite0_finetune $data hydra.sweep.dir="$out/finetune_preset"
        sweep experiment=lite0_finetune $data $recipe optimizer=adamw optimizer.lr=1e-3,3e-3,1e-2 \
            model.backbone_lr_ratio=1.0 hydra.sweep.dir="$out/finetune_adamw"
        sweep experiment=lite0_finetune $data $recipe optimizer=adamw optimizer.lr=3e-3 \
            model.backbone_lr_ratio=0.1 hydra.sweep.dir="$out/finetune_adamw_ratio"
        sweep experiment=lite0_finetune $data $recipe optimizer=sgd optimizer.nesterov=true optimizer.lr=0.01 \
            model.backbone_lr_ratio=1.0 hydra.sweep.dir="$out/finetune_sgd" ;;
    lp_ft)
        sweep experiment=lite0_lp_ft $data hydra.sweep.dir="$out/lp_ft_preset"
        sweep experiment=lite0_lp_ft $data $recipe optimizer.lr=3e-4,1e-3,3e-3 hydra.sweep.dir="$out/lp_ft" ;;
    scratch)
        sweep experiment=lite0_scratch $data hydra.sweep.dir="$out/scratch_preset"
        sweep experiment=lite0_scratch $data $recipe optimizer.lr=3e-3,1e-2 trainer.max_epochs=16 \
            hydra.sweep.dir="$out/scratch"
        # 1e-2 won at the grid's edge: one step further
        sweep experiment=lite0_scratch $data $recipe optimizer.lr=3e-2 trainer.max_epochs=16 \
            hydra.sweep.dir="$out/scratch_high" ;;
    *) echo "unknown arm '$arm': use frozen, finetune, lp_ft or scratch" >&2; exit 2 ;;
    esac
done
python -m transferlab.report "$out" --select-by val/acc_best --per experiment --out "$out/report"
cat "$out/report/selected.md"
