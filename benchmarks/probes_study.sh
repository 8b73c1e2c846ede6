#!/usr/bin/env bash
# Issue 21: the three classifiers on frozen features side by side — the L-BFGS linear probe,
# kNN (DINOv2's protocol) and nearest class mean — with EfficientNet-Lite0's ImageNet weights,
# 50 images per class, 64 px, seeds 0-2, all 10,000 test images; one report over the nine runs.
#
#   benchmarks/probes_study.sh /path/to/cifar [OUT]
#
# The features of each seed's images are computed once and cached; the later modes read them.
set -euo pipefail
root=${1:?give the folder that holds cifar-10-batches-py}
out=${2:-outputs/probes_study}
python -m transferlab -m experiment=lite0_linear_probe mode=linear_probe,knn,ncm seed=0,1,2 \
    data.fewshot.per_class=50 data.root="$root" data.download=false hydra.sweep.dir="$out"
python -m transferlab.report "$out" --out "$out/report"
