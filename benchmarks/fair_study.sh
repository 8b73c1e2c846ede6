#!/usr/bin/env bash
# Issue 19's fair study: every lite0 arm at the recipe chosen on validation (benchmarks/recipe_sweep.sh,
# docs/recipe_sweep/selected.md), 3 seeds, into one parent dir, then one report.
#
#   benchmarks/fair_study.sh /path/to/cifar [OUT] [PART...]   # OUT: outputs/fair
#
# PART: probes (frozen, linear_probe at 10/50/250 per class), finetune (finetune, lp_ft at 10/50),
# regularizers (l2sp, bss at 10/50), finetune250 (finetune at 250), scratch (scratch at 10/50),
# scratch250, report. Default: all, in that order. Two shells may run different parts at once
# (one CPU thread each: OMP_NUM_THREADS=1); accuracy does not depend on it, the time column does.
set -euo pipefail
root=${1:?give the folder that holds cifar-10-batches-py}
out=${2:-outputs/fair}
shift $(( $# >= 2 ? 2 : 1 ))
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(probes finetune regularizers finetune250 scratch scratch250 report)
common="seed=0,1,2 test=true data.root=$root data.download=false"
sweep() { python -m transferlab -m $common "$@"; }
for part in "${parts[@]}"; do
    case $part in
    probes) sweep experiment=lite0_frozen,lite0_linear_probe data.fewshot.per_class=10,50,250 hydra.sweep.dir="$out/probes" ;;
    finetune) sweep experiment=lite0_finetune,lite0_lp_ft data.fewshot.per_class=10,50 hydra.sweep.dir="$out/finetune" ;;
    regularizers) sweep experiment=lite0_l2sp,lite0_bss data.fewshot.per_class=10,50 hydra.sweep.dir="$out/regularizers" ;;
    finetune250) sweep experiment=lite0_finetune data.fewshot.per_class=250 hydra.sweep.dir="$out/finetune250" ;;
    scratch) sweep experiment=lite0_scratch data.fewshot.per_class=10,50 hydra.sweep.dir="$out/scratch" ;;
    scratch250) sweep experiment=lite0_scratch data.fewshot.per_class=250 hydra.sweep.dir="$out/scratch250" ;;
    report) python -m transferlab.report "$out" --arms experiment --out "$out/report" ;;
    *) echo "unknown part '$part'" >&2; exit 2 ;;
    esac
done
