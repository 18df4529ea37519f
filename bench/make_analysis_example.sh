#!/usr/bin/env bash
# Reproduces bench/results/analysis_example.png, the README's analysis figure, on the CPU (~5 min):
#   1. a small supervised teacher (MaskSub recipe, ViT width 96, 3 blocks, 4 px patches) on builtin:shapes;
#   2. a Masked-Distillation student distilled from it (maskdistill_tiny_builtin);
#   3. python -m fastmask.analyze on both, side by side; its summary figure is copied into bench/results/.
# Both trainings are cut to 120 steps: the figure shows the tool at work, not the paper's findings.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
run=${RUN_DIR:-runs/analysis_example}
steps=${STEPS:-120}
common=(--overwrite max_steps=$steps epochs=10 progress_bar=false attn_images=0 eval_every=0)

$py -m fastmask.train --config masksub_tiny_builtin output_dir=$run/teacher \
    model.depth=3 model.embed_dim=96 model.num_heads=2 "${common[@]}"
$py -m fastmask.train --config maskdistill_tiny_builtin output_dir=$run/student \
    method.teacher.checkpoint=$run/teacher/checkpoint.pt "${common[@]}"
$py -m fastmask.analyze --checkpoint $run/teacher/checkpoint.pt --checkpoint $run/student/checkpoint.pt \
    --label "supervised teacher" --label "MaskDistill student" \
    --data builtin:shapes --max-batches 4 --no-progress --out $run/analysis
cp $run/analysis/summary.png bench/results/analysis_example.png
echo "figure: bench/results/analysis_example.png (all figures and analysis.json in $run/analysis)"
