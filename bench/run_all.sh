#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the GPU tests, time every benchmark.
#   bash bench/run_all.sh [OUT_DIR]        (default bench/results/<gpu-name>)
# Results: pytest-benchmark JSON per suite plus the logs, ready to commit under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/$(python3 -c "import torch;print(torch.cuda.get_device_name().replace(' ','_'))" 2>/dev/null || echo cpu)}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

echo "== environment"; nvidia-smi -L || true
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "== install (offline, editable) and build fastmask._C"
$py -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
start=$(date +%s)
FASTMASK_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  $py setup.py -q build_ext --inplace 2>&1 | tail -20
echo "build: $(( $(date +%s) - start )) s"
$py -c "import fastmask; print(fastmask.ops.backends())"

echo "== GPU tests"
$py -m pytest -rs -q -m gpu tests 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -30

echo "== benchmarks"
for suite in bench/bench_*.py; do
  name=$(basename "$suite" .py)
  $py -m pytest -q -rs "$suite" --benchmark-json "$OUT_DIR/$name.json" \
      --benchmark-columns=min,median,mean,ops 2>&1 | tee "$OUT_DIR/$name.log" | tail -40
done
echo "== done: results in $OUT_DIR"
