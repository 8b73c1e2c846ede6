#!/usr/bin/env bash
# Issue 21's study: beyond clean accuracy. EfficientNet-Lite0 with its ImageNet weights, 50 images
# per class, 64 px, seeds 0-2, each arm at its lite0 preset (the recipes chosen on validation for the
# fair-arms comparison, docs/recipe_sweep/selected.md): linear probe, kNN, NCM, frozen, finetune,
# LP-FT, and WiSE-FT between each LP-FT run's probe state and its fine-tuned network. Every run fits
# a temperature on validation (calibration=auto) and is tested on CIFAR-10-C-style corruptions
# (eval=corruptions: gaussian_noise, defocus_blur, contrast, fog, jpeg_compression at severities
# 1, 3, 5 on a fixed stratified 2,000-image subset of the test split).
#
#   benchmarks/robustness_study.sh /path/to/cifar [OUT] [PART...]   # OUT: outputs/robustness
#
# PART: probes, frozen, finetune, lp_ft, wise, report (default: all, in that order). wise reads the
# lp_ft part's runs. Run it alone: the time columns depend on it, the accuracies do not.
set -euo pipefail
root=${1:?give the folder that holds cifar-10-batches-py}
out=${2:-outputs/robustness}
shift $(( $# >= 2 ? 2 : 1 ))
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(probes frozen finetune lp_ft wise report)
common="seed=0,1,2 data.fewshot.per_class=50 calibration=auto eval=corruptions data.root=$root data.download=false"
sweep() { python -m transferlab -m $common "$@"; }
for part in "${parts[@]}"; do
    case $part in
    probes) sweep experiment=lite0_linear_probe mode=linear_probe,knn,ncm hydra.sweep.dir="$out/probes" ;;
    frozen) sweep experiment=lite0_frozen hydra.sweep.dir="$out/frozen" ;;
    finetune) sweep experiment=lite0_finetune hydra.sweep.dir="$out/finetune" ;;
    lp_ft) sweep experiment=lite0_lp_ft hydra.sweep.dir="$out/lp_ft" ;;
    wise)
        # alpha 0: the probe state LP-FT starts from; alpha 1: its fine-tuned network (last epoch)
        for run in "$out"/lp_ft/[0-9]*; do
            python -m transferlab.interpolate "$run/checkpoints/probe-lbfgs.ckpt" "$run/checkpoints/last.ckpt" \
                --out "$out/wise/$(basename "$run")" --alphas 0,0.25,0.5,0.75,1 --force
        done ;;
    report) python -m transferlab.report "$out" --out "$out/report" ;;
    *) echo "unknown part '$part'" >&2; exit 2 ;;
    esac
done
