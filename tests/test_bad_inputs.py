"""Bad op inputs: the same behaviour on every backend, and no crash with value checks off.

Every backend gets the same bad inputs (bench/fuzz_bad_inputs.py's table, run in-process here on
the backends that can run) and must give the same exception type and message, or the same
documented result (NaN rows from NaN inputs; zero rows / dropped writes for out-of-range ids when
value checks are off).  The Triton kernels used to segfault the process on such ids: that case runs
in a subprocess that must not die with a signal.
"""
import os
import subprocess
import sys

import pytest
import torch

from fastmask import ops
from helpers import KERNEL_BACKENDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("torch",) + KERNEL_BACKENDS

sys.path.insert(0, os.path.join(REPO, "bench"))
import fuzz_bad_inputs as fuzz  # noqa: E402

CASES, DATA = fuzz._cases()


def _outcome(fn, backend, off):
    try:
        if off:
            with ops.value_checks(False):
                return "result", fn(ops, backend)
        return "result", fn(ops, backend)
    except Exception as e:  # noqa: BLE001
        return "error", (type(e).__name__, str(e))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_every_backend_behaves_the_same_and_clearly(index):
    name, needle, kind, fn = CASES[index]
    seen = {}
    for backend in BACKENDS:
        outcome, detail = fuzz.classify(name, needle, kind, fn, backend, DATA)
        assert outcome == "clear", f"{backend}: {outcome}: {detail}"
        seen[backend] = _outcome(fn, backend, kind.startswith("off"))
    first = seen[BACKENDS[0]]
    for backend, other in seen.items():
        assert other[0] == first[0], (backend, other, first)
        if first[0] == "error":
            assert other[1] == first[1], f"{backend} says {other[1]}, {BACKENDS[0]} says {first[1]}"
        else:
            a, b = first[1], other[1]
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                torch.testing.assert_close(y, x, equal_nan=True, rtol=1e-4, atol=1e-5)


def test_error_messages_are_one_line_and_name_the_argument():
    for name, needle, kind, fn in CASES:
        if kind != "error":
            continue
        outcome, detail = _outcome(fn, "torch", False)
        assert outcome == "error" and detail[0] in ("ValueError", "TypeError"), (name, detail)
        assert needle in detail[1] and "\n" not in detail[1], (name, detail)


_CHILD = r"""
import os, sys, torch
os.environ.setdefault("TRITON_INTERPRET", "1")
from fastmask import ops
B, N, D, K = 2, 197, 40, 49
x = torch.randn(B, N, D)
ids = torch.stack([torch.randperm(N)[:K] for _ in range(B)])
for bad in (N, 2 ** 40, -1, -(2 ** 40), 2 ** 62):
    ids_bad = ids.clone(); ids_bad[1, 7] = bad
    with ops.value_checks(False):
        out = ops.gather_tokens(x, ids_bad, backend=sys.argv[1])
        back = ops.scatter_tokens(out, ids_bad, N, backend=sys.argv[1])
        pos = ops.gather_tokens(x, ids_bad, pos_embed=torch.randn(N, D), backend=sys.argv[1])
    assert bool((out[1, 7] == 0).all()) and bool((back[1].abs().sum(-1) > 0).sum() == K - 1), bad
    x_req = x.clone().requires_grad_(True)
    with ops.value_checks(False):
        ops.gather_tokens(x_req, ids_bad, backend=sys.argv[1]).sum().backward()
    assert int((x_req.grad[1].abs().sum(-1) > 0).sum()) == K - 1
print("survived")
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_with_value_checks_off_never_crash(backend):
    """Was exit 139 (SIGSEGV) on the Triton interpreter: ids far outside [0, N) with checks off."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, backend], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed by signal {-proc.returncode}): {proc.stderr[-1500:]}"
    assert "survived" in proc.stdout


def test_seeds_outside_64_bits_are_rejected_not_aliased():
    x = torch.randn(2, 9, 4)
    a = ops.random_masking(x, 0.5, seed=5).ids_keep
    assert torch.equal(a, ops.random_masking(x, 0.5, seed=5).ids_keep)
    ops.random_masking(x, 0.5, seed=2 ** 64 - 1)  # the largest seed is fine
    for bad in (2 ** 64, 2 ** 64 + 5, -1):
        with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*64\)"):
            ops.random_masking(x, 0.5, seed=bad)
    with pytest.raises(TypeError, match="seed must be an int"):
        ops.random_masking(x, 0.5, seed=1.5)


_TOKEN_EMU_PRELUDE = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
struct Dim3 { unsigned x = 0, y = 0; };
Dim3 threadIdx, blockDim, emu_block_idx;
#define blockIdx emu_block_idx
inline void __syncthreads() {}  // one thread per block: the phases run in order
namespace fastmask {
"""

_TOKEN_EMU_MAIN = r"""
}  // namespace fastmask
using namespace fastmask;
int main() {
  const int64_t B = 2, N = 9, D = 8, K = 4;
  std::vector<float> x(B * N * D);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 1.0f + float(i);
  const int64_t bad[] = {N, int64_t(1) << 40, -1, -(int64_t(1) << 40), int64_t(1) << 62};
  for (int64_t bad_id : bad) {
    std::vector<int64_t> ids = {0, 3, 5, 8, 1, bad_id, 4, 7};
    for (int vec : {1, 4}) {
      std::vector<float> out(B * K * D, -7.0f);
      blockDim.x = 1; blockDim.y = 1; threadIdx.x = 0; threadIdx.y = 0;
      for (int64_t row = 0; row < B * K; ++row) {
        emu_block_idx.x = unsigned(row);
        if (vec == 1) gather_rows_kernel<float, float, 1, false, false>(x.data(), ids.data(), nullptr, out.data(), B * K, K, D, N, N * D, D, 1, 0, 0);
        else gather_rows_kernel<float, float, 4, false, false>(x.data(), ids.data(), nullptr, out.data(), B * K, K, D, N, N * D, D, 1, 0, 0);
      }
      for (int64_t row = 0; row < B * K; ++row) {
        const int64_t b = row / K, t = ids[row];
        for (int64_t d = 0; d < D; ++d) {
          const float want = (t < 0 || t >= N) ? 0.0f : x[(b * N + t) * D + d];
          if (out[row * D + d] != want) { std::printf("gather mismatch id %lld\n", (long long)t); return 3; }
        }
      }
    }
    // token slots with guard zones on both sides: nothing may be written outside [0, B*N).
    const int64_t guard = 64;
    std::vector<int32_t> slots(B * N + 2 * guard, 12345);
    for (int64_t b = 0; b < B; ++b) { emu_block_idx.x = unsigned(b); token_slots_kernel(ids.data(), slots.data() + guard, N, K); }
    for (int64_t i = 0; i < guard; ++i)
      if (slots[i] != 12345 || slots[guard + B * N + i] != 12345) { std::printf("slot write out of bounds\n"); return 4; }
    int kept = 0;
    for (int64_t i = 0; i < B * N; ++i) kept += slots[guard + i] >= 0;
    if (kept != B * K - 1) { std::printf("expected %lld slots, got %d\n", (long long)(B * K - 1), kept); return 5; }
  }
  std::printf("survived\n");
  return 0;
}
"""


def _without_host_functions(code: str) -> str:
    """Drop the host helpers (they take at::Tensor) from a slice of the .cu file: device code stays."""
    out, skipping = [], False
    for line in code.splitlines():
        if skipping:
            skipping = line != "}"
            continue
        if "at::Tensor" in line and not line.startswith((" ", "/")):
            if out and out[-1].startswith("template"):
                out.pop()
            skipping = not line.rstrip().endswith("}")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


@pytest.mark.slow
def test_cuda_token_kernels_bounds_on_cpu_emulation(tmp_path):
    """csrc/token_gather.cu's gather and token-slot kernels compiled for the CPU (one thread per
    block) with ids far outside [0, N): zero rows, no write outside the slot rows, no signal."""
    import shutil

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CPU emulation of csrc/token_gather.cu")
    src = open(os.path.join(REPO, "csrc", "token_gather.cu")).read()
    start = src.index("template <typename T, int N>\nstruct alignas")
    pack = src[start: src.index("};", start) + 2]
    body_start = src.index("template <typename scalar_t, int VEC>\n__device__ __forceinline__ Pack<scalar_t, VEC> load_row_chunk")
    body_end = src.index("__global__ void token_slots_kernel")
    body_end = src.index("\n}\n", body_end) + 3
    body = _without_host_functions(src[body_start:body_end])
    (tmp_path / "emu.cpp").write_text(_TOKEN_EMU_PRELUDE + pack + "\n" + body + _TOKEN_EMU_MAIN)
    exe = tmp_path / "emu"
    res = subprocess.run([cxx, "-std=c++17", "-O1", "-o", str(exe), str(tmp_path / "emu.cpp")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"exit {run.returncode} (negative: signal): {run.stdout} {run.stderr}"
    assert "survived" in run.stdout
