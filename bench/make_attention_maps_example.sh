#!/usr/bin/env bash
# Reproduces bench/results/attention_maps_example.png and the README's eval/export figures on the CPU:
#   1. the default DINO recipe (dino_tiny_builtin) cut to 150 steps (10 epochs) on builtin:shapes;
#   2. python -m fastmask.eval (k-NN + linear probe), fastmask.export (timm safetensors, round-trip checked)
#      and fastmask.attention_maps (per-head maps, top-60% mass, AttMask masks) on its teacher.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
run=${RUN_DIR:-runs/attention_maps_example}
$py -m fastmask.train --overwrite output_dir=$run max_steps=${STEPS:-150} progress_bar=false
$py -m fastmask.eval $run/checkpoint.pt --out $run/eval.json
$py -m fastmask.export $run/checkpoint.pt --out $run/dino_teacher.safetensors
$py -m fastmask.attention_maps $run/checkpoint.pt --num-images 4 --image-size 64 --threshold 0.6 --mask-ratio 0.3 \
    --out $run/maps
cp $run/maps/attn_002_class2.png bench/results/attention_maps_example.png
echo "figure: bench/results/attention_maps_example.png (all maps in $run/maps, numbers in $run/eval.json)"
