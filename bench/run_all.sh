#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the GPU tests, time the benchmarks, all
# inside a time budget, most important first.
#
#   BUDGET_S=540 bash bench/run_all.sh [OUT_DIR]     (OUT_DIR default: bench/results/<gpu-name>)
#
# Stages, in order: build fastmask._C; the attention benchmark (every SDPA backend, the fused Triton
# kernel, SDPA + the CLS-row kernel, and measured dispatch: each dispatch case records every
# candidate's time and the choice; the tile shapes each masked length hits); the top-k/AttMask and
# token benchmarks; the GPU tests (pytest -m gpu, spread over processes with pytest-xdist when it is
# there: Triton compiles are CPU-bound); the model, supervised, training and data benchmarks.
# Measured dispatch keeps its choices in OUT_DIR/dispatch/dispatch.json (FASTMASK_CACHE_DIR), so the
# call returns them, and later stages reuse them instead of measuring again.
# Each stage gets what is left of the budget and is interrupted (SIGINT: pytest-benchmark still
# writes the JSON of what finished) at the deadline; stages that no longer fit are listed as
# skipped in summary.txt.  Results: one pytest-benchmark JSON per suite, the logs and summary.txt
# in OUT_DIR, ready to commit under bench/results/.  Where $OUT is set (the device tool, which
# returns at most 8 files), OUT_DIR is also packed into $OUT/results.tgz after every stage, so a
# call cut short still returns everything finished so far.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
start=$(date +%s)
deadline=$((start + BUDGET_S))
OUT_DIR=${1:-bench/results/$($py -c "import torch;print(torch.cuda.get_device_name().replace(' ','_'))" 2>/dev/null || echo cpu)}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
export FASTMASK_CACHE_DIR="$OUT_DIR/dispatch"
unset FASTMASK_BACKEND  # measured dispatch on: the benchmarks record what it picks
summary="$OUT_DIR/summary.txt"
: > "$summary"

note() { echo "$*" | tee -a "$summary"; }
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" -C "$OUT_DIR" . 2>/dev/null; return 0; }

# stage NAME MIN_S CMD...: run CMD with what is left of the budget (less a 15 s reserve for
# packing), or skip it when less than MIN_S is left.
stage() {
  local name=$1 min_s=$2; shift 2
  local left=$((deadline - $(date +%s) - 15))
  if [ "$left" -lt "$min_s" ]; then
    note "SKIPPED $name: ${left} s left of the budget, it needs ${min_s} s"
    return
  fi
  echo "== $name (up to ${left} s)"
  local t0=$(date +%s)
  # (timeout signals its whole process group, so pytest under bash -c gets the SIGINT too)
  timeout -s INT -k 20 "$left" bash -c '"$@"' _ "$@" 2>&1 | tee "$OUT_DIR/$name.log" | tail -25
  local rc=${PIPESTATUS[0]}
  local status="rc=$rc"; [ "$rc" -eq 124 ] && status="cut off at the deadline"
  note "$name: $status, $(( $(date +%s) - t0 )) s"
  pack
}

note "== $(date -u +%FT%TZ) budget ${BUDGET_S} s"
nvidia-smi -L 2>&1 | tee -a "$summary" || true
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$summary"

build() {
  $py -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
  FASTMASK_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    $py setup.py -q build_ext --inplace 2>&1 | grep -E "error|Error" | head -20
  $py -c "import fastmask; print(fastmask.ops.backends())"
}

bench() {  # bench SUITE [pytest args]: one suite's JSON in OUT_DIR
  local suite=$1; shift
  $py -m pytest -q -rs "bench/$suite.py" --benchmark-json "$OUT_DIR/$suite.json" \
    --benchmark-columns=min,median,mean,ops "$@"
}

gpu_tests() {
  local par=()
  $py -c "import xdist" 2>/dev/null && par=(-n "${TEST_PROCS:-8}")
  $py -m pytest -rs -q -m gpu "${par[@]}" tests
}

export py OUT_DIR
export -f build bench gpu_tests

# Kernel suites time with triton.testing.do_bench (recorded as kernel_ms); pytest-benchmark's own
# rounds are kept short there.
quick=(--benchmark-max-time=0.2 --benchmark-min-rounds=5)
[ "${SKIP_BUILD:-0}" = 1 ] && note "build: skipped (SKIP_BUILD=1)" || stage build 60 build
# ViT-S/B at B = 64 and 256 (the 128 and 512 cases are left to a longer run): ~100 cases, ~3 min.
stage bench_attention 90 bench bench_attention "${quick[@]}" -k "not 128 and not 512"
stage bench_topk_mask 60 bench bench_topk_mask "${quick[@]}"
stage bench_token_gather 45 bench bench_token_gather "${quick[@]}"
stage gpu_tests 60 gpu_tests
for suite in bench_models bench_supervised bench_train bench_data; do
  stage "$suite" 45 bench "$suite"
done
$py -c "import json, os; p = os.path.join(os.environ['FASTMASK_CACHE_DIR'], 'dispatch.json'); d = json.load(open(p)) if os.path.exists(p) else {}; print('dispatch choices:', len(d.get('choices', {})), 'keys on', d.get('fingerprint'))" | tee -a "$summary"
note "== done in $(( $(date +%s) - start )) s: results in $OUT_DIR"
pack
