"""Top-k token selection and AttMask masks: every kernel backend equals the reference bit for bit.

Kernel backends come from helpers.KERNEL_BACKENDS (the Triton interpreter on a CPU machine; Triton
and CUDA on a GPU with the extension built).  Besides kernel == reference, the properties the
reference itself must have are checked independently (exact counts, the hidden set is the true
top-k, hints only among the most attended, gate frequency, determinism, errors).
"""
import pytest
import torch

from fastmask import ops, reference
from fastmask.philox import philox4x32
from helpers import DEVICE, DTYPES, KERNEL_BACKENDS, launched_kernels, noncontiguous

MODES = ("high", "low", "hint")


def tied_scores(B, N, dtype, generator, levels=5):
    """Scores with many exact ties (a few levels), signed zeros and some distinct values."""
    s = torch.randint(0, levels, (B, N), generator=generator).float() / levels - 0.4
    distinct = torch.rand(B, N, generator=generator) < 0.3
    s = torch.where(distinct, torch.randn(B, N, generator=generator), s)
    s = torch.where(torch.rand(B, N, generator=generator) < 0.1, torch.tensor(-0.0), s)
    return s.to(device=DEVICE, dtype=dtype)


def ks_for(N):
    return sorted({0, 1, max(N - 1, 0), N})


# ------------------------------------------------------------------------------------------------
# topk_tokens
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 49, 196, 197])
def test_topk_tokens_matches_reference(backend, dtype, N):
    g = torch.Generator().manual_seed(N)
    scores = tied_scores(3, N, dtype, g)
    for largest in (True, False):
        for k in ks_for(N):
            out = ops.topk_tokens(scores, k, largest=largest, backend=backend)
            ref = reference.topk_tokens(scores, k, largest)
            assert out.dtype == torch.int64 and out.shape == (3, k)
            assert torch.equal(out, ref), f"{backend} {dtype} N={N} k={k} largest={largest}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_topk_tokens_long_rows_and_noncontiguous(backend):
    g = torch.Generator().manual_seed(784)
    scores = tied_scores(2, 784, torch.float32, g, levels=50)
    for k in (1, 392, 783):
        ref = reference.topk_tokens(scores, k, True)
        assert torch.equal(ops.topk_tokens(scores, k, backend=backend), ref)
        assert torch.equal(ops.topk_tokens(noncontiguous(scores), k, backend=backend), ref)
    bf = scores.to(torch.bfloat16)
    assert torch.equal(ops.topk_tokens(bf, 100, largest=False, backend=backend), reference.topk_tokens(bf, 100, False))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_topk_tokens_extreme_values(backend):
    # Infinities, denormals, the largest finite values and both zeros, each ordered like torch.sort.
    vals = torch.tensor([float("inf"), -float("inf"), 1e-45, -1e-45, 3.4e38, -3.4e38, 0.0, -0.0, 1.0, -1.0])
    scores = vals[torch.randperm(10, generator=torch.Generator().manual_seed(0))].repeat(2, 3).to(DEVICE)
    for largest in (True, False):
        for k in (1, 7, 15, 29):
            out = ops.topk_tokens(scores, k, largest=largest, backend=backend)
            assert torch.equal(out, reference.topk_tokens(scores, k, largest))


def mixed_rows(B, N, generator):
    """Rows of different shapes: constant, two-valued, softmax (as CLS maps), wide normal, with infinities."""
    kinds = torch.randint(0, 5, (B,), generator=generator)
    rows = []
    for kind in kinds.tolist():
        if kind == 0:
            row = torch.full((N,), float(torch.randn(1, generator=generator)))
        elif kind == 1:
            row = torch.randint(0, 2, (N,), generator=generator).float() * 3.0 - 1.0
        elif kind == 2:
            row = (torch.randn(N, generator=generator) * 3).softmax(0)
        elif kind == 3:
            row = torch.randn(N, generator=generator) * 1e30
        else:
            row = torch.randn(N, generator=generator)
            row[torch.randint(0, N, (2,), generator=generator)] = torch.tensor([float("inf"), -float("inf")])
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_topk_tokens_fuzz(backend):
    # Random row shapes, sizes, k and dtypes: the radix select's shortcuts (shared-prefix start, stop
    # at an exact count) must never change the answer.
    g = torch.Generator().manual_seed(123)
    for trial in range(24):
        N = int(torch.randint(1, 300, (1,), generator=g))
        dtype = DTYPES[trial % 3]
        scores = mixed_rows(6, N, g).to(device=DEVICE, dtype=dtype)
        k = int(torch.randint(0, N + 1, (1,), generator=g))
        largest = bool(trial % 2)
        out = ops.topk_tokens(scores, k, largest=largest, backend=backend)
        assert torch.equal(out, reference.topk_tokens(scores, k, largest)), (trial, N, k, dtype, largest)
        ratio = torch.rand(6, generator=g).to(DEVICE) * 0.99
        for mode in MODES:
            kw = dict(mode=mode, seed=trial, show_max=0.3, show_ratio=0.2 if mode == "hint" else None)
            assert torch.equal(ops.cls_attention_mask(scores, ratio, backend=backend, **kw),
                               ops.cls_attention_mask(scores, ratio, backend="torch", **kw)), (trial, mode)


@pytest.mark.parametrize("backend", ("torch",) + KERNEL_BACKENDS)
def test_topk_tokens_is_the_true_topk(backend):
    g = torch.Generator().manual_seed(1)
    scores = tied_scores(4, 197, torch.float16, g)
    k = 60
    for largest in (True, False):
        ids = ops.topk_tokens(scores, k, largest=largest, backend=backend).cpu()
        s = scores.float().cpu()
        for b in range(4):
            row = ids[b].tolist()
            assert row == sorted(set(row)), "indices must be unique and ascending"
            chosen = torch.zeros(197, dtype=torch.bool)
            chosen[ids[b]] = True
            worst_in = s[b][chosen].min() if largest else s[b][chosen].max()
            best_out = s[b][~chosen].max() if largest else s[b][~chosen].min()
            assert (worst_in >= best_out) if largest else (worst_in <= best_out)
            # Among tied boundary values the lower indices win.
            tied = (s[b] == worst_in).nonzero().flatten()
            taken = chosen[tied]
            assert not bool((~taken[:-1] & taken[1:]).any()), "ties must go to the lower index"


# ------------------------------------------------------------------------------------------------
# cls_attention_mask: kernel == reference
# ------------------------------------------------------------------------------------------------

def _ratio(kind, B, generator, low=0.0, high=0.99):
    if kind == "float":
        return low + 0.37 * (high - low)
    return (low + (high - low) * torch.rand(B, generator=generator)).to(DEVICE)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cls_attention_mask_matches_reference(backend, dtype, mode):
    g = torch.Generator().manual_seed(10 * DTYPES.index(dtype) + MODES.index(mode))
    for i, N in enumerate((1, 49, 197)):
        B = 4
        attn = tied_scores(B, N, dtype, g)
        mask_prob = (0.0, 0.5, 1.0)[i]
        kw = dict(mode=mode, mask_prob=mask_prob, show_max=0.2, seed=1000 + i)
        ratio = _ratio("tensor" if i % 2 else "float", B, g)
        if mode == "hint":
            kw["show_ratio"] = _ratio("float" if i % 2 else "tensor", B, g, 0.0, 0.2)
        out = ops.cls_attention_mask(attn, ratio, backend=backend, **kw)
        ref = ops.cls_attention_mask(attn, ratio, backend="torch", **kw)
        assert out.dtype == torch.bool and out.shape == (B, N)
        assert torch.equal(out, ref), f"{backend} {dtype} {mode} N={N} mask_prob={mask_prob}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_cls_attention_mask_long_rows(backend, mode):
    g = torch.Generator().manual_seed(7)
    attn = tied_scores(2, 784, torch.bfloat16, g, levels=20)
    kw = dict(mode=mode, mask_prob=1.0, show_max=0.1, seed=5)
    if mode == "hint":
        kw["show_ratio"] = torch.tensor([0.0, 0.05], device=DEVICE)
    ratio = torch.tensor([0.1, 0.75], device=DEVICE)
    out = ops.cls_attention_mask(noncontiguous(attn), ratio, backend=backend, **kw)
    assert torch.equal(out, ops.cls_attention_mask(attn, ratio, backend="torch", **kw))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mask_prob", [0.0, 0.5, 1.0])
def test_cls_attention_mask_gate_matches_reference(backend, mask_prob):
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(16, 49, generator=g).to(DEVICE)
    for mode in ("high", "hint"):
        kw = dict(mode=mode, mask_prob=mask_prob, seed=11, show_ratio=0.05 if mode == "hint" else None)
        out = ops.cls_attention_mask(attn, 0.4, backend=backend, **kw)
        assert torch.equal(out, ops.cls_attention_mask(attn, 0.4, backend="torch", **kw))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_handles_unchecked_counts_like_reference(backend):
    # With value checks off a per-sample show_ratio may exceed the show_max pool (every candidate is
    # revealed) and ratios may leave [0, 1): the kernels clamp the counts like the reference.
    from fastmask.philox import seed_tensor

    g = torch.Generator().manual_seed(9)
    attn = torch.rand(4, 49, generator=g).to(DEVICE)
    ratio = torch.tensor([0.0, 20.5 / 49, 1.0, -0.3], dtype=torch.float64, device=DEVICE)
    show_ratio = torch.tensor([9.5 / 49, 2.5 / 49, 0.9, 0.1], device=DEVICE)
    seed = seed_tensor(seed=21, device=DEVICE)
    op = torch.ops.fastmask.cls_attention_mask
    out = op(attn, ratio, 0.0, seed, "hint", 1.0, 4.5 / 49, show_ratio, 0.0, backend)
    ref = reference.cls_attention_mask(attn, ratio, 0.0, 21, "hint", 1.0, 4.5 / 49, show_ratio, 0.0)
    assert torch.equal(out, ref)
    # One count for every row instead of per-row ratios (what ops passes for a float ratio).
    out = op(attn, None, 1.3, seed, "hint", 1.0, 4.5 / 49, None, -0.05, backend)
    assert torch.equal(out, reference.cls_attention_mask(attn, None, 1.3, 21, "hint", 1.0, 4.5 / 49, None, -0.05))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("ratio_dtype", DTYPES + (torch.float64,))
def test_per_row_ratios_count_like_reference(backend, ratio_dtype):
    # The kernels turn per-row ratios into counts themselves: floor(float64(r) * N) for every float
    # dtype, including ratios whose product with N is an integer or lies just below one.
    N = 197
    near = [k / N for k in (0, 1, 50, 98, 196)] + [torch.nextafter(torch.tensor(k / N, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)).item()
                                                   for k in (1, 50, 98)]
    ratio = torch.tensor(near, dtype=torch.float64).to(ratio_dtype)
    ratio = torch.stack([ratio, ratio]).t().to(DEVICE)[:, 0]  # a strided [B] view
    attn = torch.rand(ratio.shape[0], N, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    for mode in MODES:
        kw = dict(mode=mode, seed=3, show_max=0.5, show_ratio=ratio * 0.5 if mode == "hint" else None)
        out = ops.cls_attention_mask(attn, ratio, backend=backend, **kw)
        assert torch.equal(out, ops.cls_attention_mask(attn, ratio, backend="torch", **kw)), mode
        if mode != "hint":
            assert torch.equal(out.sum(1), torch.floor(ratio.double() * N).long())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("triton", "cuda"))
@pytest.mark.parametrize("N", [196, 784, 1024])
def test_kernels_at_training_shapes(backend, N):
    if backend not in KERNEL_BACKENDS:
        pytest.skip("the CUDA extension fastmask._C is not built")
    g = torch.Generator(device="cuda").manual_seed(N)
    attn = torch.rand(1024, N, device="cuda", generator=g).to(torch.float16)  # fp16: plenty of ties
    ratio = 0.1 + 0.4 * torch.rand(1024, device="cuda", generator=g)
    show = 0.01 + 0.04 * torch.rand(1024, device="cuda", generator=g)
    for mode in MODES:
        kw = dict(mode=mode, mask_prob=0.5, seed=N, show_ratio=show if mode == "hint" else None)
        assert torch.equal(ops.cls_attention_mask(attn, ratio, backend=backend, **kw),
                           ops.cls_attention_mask(attn, ratio, backend="torch", **kw))
    for k in (1, N // 2, N - 1):
        assert torch.equal(ops.topk_tokens(attn, k, backend=backend), reference.topk_tokens(attn, k))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_ops_launch_one_kernel(backend):
    # The point of fusing: at training sizes these ops are launch-bound, so each call is one kernel
    # (per-row counts are computed inside it, the output needs no memset).  The torch recipes they
    # replace launch 2 (top-k + sort), 8-9 (AttMask-High) and 25 (AttMask-Hint) kernels.  The seed
    # is a device tensor drawn once per call (one more small launch, what CUDA-graph replay needs):
    # drawn outside the count here.
    from fastmask.philox import seed_tensor

    seed = seed_tensor(seed=1, device=DEVICE)
    g = torch.Generator().manual_seed(2)
    attn = torch.rand(8, 196, generator=g).to(DEVICE)
    ratio = (0.1 + 0.4 * torch.rand(8, generator=g)).to(DEVICE)
    show = (0.01 + 0.04 * torch.rand(8, generator=g)).to(DEVICE)
    calls = {
        "topk": lambda: ops.topk_tokens(attn, 98, backend=backend),
        "high, per-row ratios": lambda: ops.cls_attention_mask(attn, ratio, seed=seed, backend=backend),
        "low, float ratio": lambda: ops.cls_attention_mask(attn, 0.3, mode="low", seed=seed, backend=backend),
        "hint, gated": lambda: ops.cls_attention_mask(attn, ratio, mode="hint", mask_prob=0.5, show_max=0.1,
                                                      show_ratio=show, seed=seed, backend=backend),
    }
    with ops.value_checks(False):  # the checks sync on purpose; training runs without them
        for what, call in calls.items():
            kernels = launched_kernels(call)
            assert len(kernels) == 1, f"{what}: {kernels}"


# ------------------------------------------------------------------------------------------------
# properties of the masks (checked on the reference and on every kernel backend)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ("torch",) + KERNEL_BACKENDS)
def test_masks_hide_exact_true_topk_per_sample(backend):
    g = torch.Generator().manual_seed(5)
    B, N = 6, 197
    attn = torch.rand(B, N, generator=g).to(DEVICE)  # distinct values: the top-k set is unique
    ratio = torch.rand(B, generator=g).to(DEVICE) * 0.99
    counts = torch.floor(ratio.double() * N).long()
    for mode in ("high", "low"):
        mask = ops.cls_attention_mask(attn, ratio, mode=mode, seed=1, backend=backend)
        assert torch.equal(mask.sum(1), counts), "per-sample ratios give exact per-row counts"
        for b in range(B):
            order = torch.argsort(attn[b], descending=(mode == "high"))
            expected = torch.zeros(N, dtype=torch.bool, device=DEVICE)
            expected[order[: counts[b]]] = True
            assert torch.equal(mask[b], expected)


@pytest.mark.parametrize("backend", ("torch",) + KERNEL_BACKENDS)
def test_hints_reveal_only_top_attended(backend):
    g = torch.Generator().manual_seed(6)
    B, N, show_max = 5, 196, 0.1
    attn = torch.rand(B, N, generator=g).to(DEVICE)
    show_ratio = torch.tensor([0.01, 0.02, 0.05, 0.1, 0.0], device=DEVICE)
    high = ops.cls_attention_mask(attn, 0.4, mode="high", seed=2, backend=backend)
    hint = ops.cls_attention_mask(attn, 0.4, mode="hint", show_max=show_max, show_ratio=show_ratio, seed=2,
                                  backend=backend)
    assert not bool((hint & ~high).any()), "hints only reveal, never hide"
    revealed = high & ~hint
    assert torch.equal(revealed.sum(1), torch.floor(show_ratio.double() * N).long())
    top = torch.argsort(attn, dim=1, descending=True)[:, : int(show_max * N)]
    pool = torch.zeros(B, N, dtype=torch.bool, device=DEVICE).scatter_(1, top, True)
    assert not bool((revealed & ~pool).any()), "revealed tokens lie among the show_max most attended"


def test_hint_reveals_are_random_over_the_pool():
    # Every token of the pool is revealed sometimes, at about the expected rate (reference statistics).
    B, N = 2000, 100
    attn = torch.arange(N, dtype=torch.float32).flip(0).expand(B, N).contiguous()  # pool = tokens 0..9
    high = ops.cls_attention_mask(attn, 0.3, mode="high", seed=0, backend="torch")
    hint = ops.cls_attention_mask(attn, 0.3, mode="hint", show_max=0.1, show_ratio=0.03, seed=0, backend="torch")
    freq = (high & ~hint).float().mean(0)
    assert torch.allclose(freq[:10], torch.full((10,), 0.3), atol=0.05)  # 3 of 10 per row
    assert freq[10:].sum() == 0


def test_gate_frequency_matches_mask_prob():
    B, N = 4000, 16
    attn = torch.rand(B, N, generator=torch.Generator().manual_seed(0))
    for mask_prob in (0.0, 0.25, 0.5, 1.0):
        mask = ops.cls_attention_mask(attn, 0.5, mask_prob=mask_prob, seed=123, backend="torch")
        masked_rows = mask.any(1).float().mean().item()
        assert abs(masked_rows - mask_prob) < 0.03, (mask_prob, masked_rows)
        assert bool((mask.sum(1)[mask.any(1)] == 8).all())
    # The gate is Philox lane 1 at offset b, identical for every backend.
    gate = philox4x32(123, torch.arange(B))[1] < reference.gate_threshold(0.5)
    mask = ops.cls_attention_mask(attn, 0.5, mask_prob=0.5, seed=123, backend="torch")
    assert torch.equal(mask.any(1), gate)


@pytest.mark.parametrize("backend", ("torch",) + KERNEL_BACKENDS)
def test_determinism_under_a_seed(backend):
    attn = torch.rand(4, 49, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    kw = dict(mode="hint", mask_prob=0.5, show_max=0.2, show_ratio=0.1, backend=backend)
    a = ops.cls_attention_mask(attn, 0.3, generator=torch.Generator().manual_seed(42), **kw)
    b = ops.cls_attention_mask(attn, 0.3, generator=torch.Generator().manual_seed(42), **kw)
    assert torch.equal(a, b)
    draws = {ops.cls_attention_mask(attn, 0.3, seed=s, **kw).cpu().numpy().tobytes() for s in range(6)}
    assert len(draws) > 1, "different seeds must give different masks"


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

def test_clear_errors():
    attn = torch.rand(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="k must"):
        ops.topk_tokens(attn, 11)
    with pytest.raises(ValueError, match="k must"):
        ops.topk_tokens(attn, -1)
    with pytest.raises(ValueError, match="scores"):
        ops.topk_tokens(torch.rand(10, device=DEVICE), 1)
    with pytest.raises(TypeError, match="scores"):
        ops.topk_tokens(torch.arange(10, device=DEVICE).view(2, 5), 1)
    nan = attn.clone()
    nan[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.topk_tokens(nan, 2)
    with pytest.raises(ValueError, match="NaN"):
        ops.cls_attention_mask(nan, 0.5)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            ops.cls_attention_mask(attn, bad)
    with pytest.raises(ValueError, match="ratio"):
        ops.cls_attention_mask(attn, torch.tensor([0.2, 1.0], device=DEVICE))
    with pytest.raises(ValueError, match="ratio"):
        ops.cls_attention_mask(attn, torch.tensor([0.2, 0.3, 0.4], device=DEVICE))
    with pytest.raises(ValueError, match="show_ratio"):
        ops.cls_attention_mask(attn, 0.5, mode="hint")
    with pytest.raises(ValueError, match="show_max"):
        ops.cls_attention_mask(attn, 0.5, mode="hint", show_max=0.1, show_ratio=0.5)
    with pytest.raises(ValueError, match="mode"):
        ops.cls_attention_mask(attn, 0.5, mode="middle")
    with pytest.raises(ValueError, match="mask_prob"):
        ops.cls_attention_mask(attn, 0.5, mask_prob=1.5)


# ------------------------------------------------------------------------------------------------
# the CUDA kernels' logic, run on the CPU: csrc/topk_mask.cu's device code compiled as host C++
# with one std::thread per CUDA thread (barriers for __syncthreads, a per-warp exchange for the
# shuffles and ballots).  This checks the algorithm and its indexing on machines without a GPU;
# the real kernels are compared with the reference by the tests above wherever a GPU is present.
# ------------------------------------------------------------------------------------------------

_EMU_PRELUDE = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
struct Dim { unsigned x = 0; };
thread_local Dim threadIdx;
Dim emu_block_idx, blockDim;
#define blockIdx emu_block_idx
struct Half16 { uint16_t x; };  // the kernels only read the 16 bits of half/bfloat16 values
uint32_t emu_shared[1 << 16];
std::unique_ptr<std::barrier<>> emu_block_barrier;
std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
int emu_warp_buf[64][32];
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
template <typename F> inline int emu_warp_exchange(int value, F read) {
  const int w = threadIdx.x / 32;
  emu_warp_barriers[w]->arrive_and_wait();
  emu_warp_buf[w][threadIdx.x % 32] = value;
  emu_warp_barriers[w]->arrive_and_wait();
  const int out = read(emu_warp_buf[w]);
  emu_warp_barriers[w]->arrive_and_wait();
  return out;
}
inline int __shfl_xor_sync(unsigned, int v, int off) {
  return emu_warp_exchange(v, [&](int* buf) { return buf[(threadIdx.x % 32) ^ off]; });
}
inline unsigned __ballot_sync(unsigned, bool p) {
  return unsigned(emu_warp_exchange(p, [](int* buf) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= unsigned(buf[i] != 0) << i;
    return int(r);
  }));
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }
using std::max;
using std::min;
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
"""

_EMU_MAIN = r"""
}  // namespace fastmask
using namespace fastmask;
template <typename F> void launch(long B, long N, F body) {
  int threads = 32;
  while (threads < N && threads < 256) threads *= 2;  // threads_for() in the .cu file
  blockDim.x = threads;
  for (long b = 0; b < B; ++b) {
    emu_block_idx.x = b;
    emu_block_barrier = std::make_unique<std::barrier<>>(threads);
    emu_warp_barriers.clear();
    for (int w = 0; w < threads / 32; ++w) emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { threadIdx.x = t; body(); });
    for (auto& th : pool) th.join();
  }
}
int main() {
  std::string kind;
  int bits;
  while (std::cin >> kind >> bits) {
    long B, N;
    std::cin >> B >> N;
    std::vector<float> f(B * N);
    std::vector<Half16> h(B * N);
    for (long i = 0; i < B * N; ++i) {
      uint32_t u;
      std::cin >> u;
      if (bits == 32) std::memcpy(&f[i], &u, 4); else h[i].x = uint16_t(u);
    }
    if (kind == "topk") {
      int k, largest;
      std::cin >> k >> largest;
      std::vector<int64_t> ids(B * k, -1);
      if (bits == 32) launch(B, N, [&] { topk_tokens_kernel<float>(f.data(), ids.data(), N, k, largest); });
      else launch(B, N, [&] { topk_tokens_kernel<Half16>(h.data(), ids.data(), N, k, largest); });
      for (auto v : ids) std::cout << v << ' ';
    } else {
      uint64_t seed;
      int64_t threshold;
      int candidates, mode;
      std::cin >> seed >> threshold >> candidates >> mode;
      // Each count: "c <count>" (one for every row), "f <B float ratios>" or "d <B double ratios>".
      std::vector<float> ratio_f[2];
      std::vector<double> ratio_d[2];
      RowCount counts[2];
      for (int c = 0; c < 2; ++c) {
        std::string how;
        std::cin >> how;
        if (how == "c") {
          int64_t count;
          std::cin >> count;
          counts[c] = RowCount{nullptr, 0, false, count};
        } else if (how == "f") {
          ratio_f[c].resize(B);
          for (auto& v : ratio_f[c]) std::cin >> v;
          counts[c] = RowCount{ratio_f[c].data(), 1, false, 0};
        } else {
          ratio_d[c].resize(B);
          for (auto& v : ratio_d[c]) std::cin >> v;
          counts[c] = RowCount{ratio_d[c].data(), 1, true, 0};
        }
      }
      std::vector<char> out(B * N, 0);
      bool* mask = reinterpret_cast<bool*>(out.data());
      const int64_t* seed_ptr = reinterpret_cast<const int64_t*>(&seed);  // the kernel reads it from memory
      if (bits == 32) launch(B, N, [&] { cls_attention_mask_kernel<float>(f.data(), counts[0], counts[1], mask, N, seed_ptr, threshold, candidates, mode); });
      else launch(B, N, [&] { cls_attention_mask_kernel<Half16>(h.data(), counts[0], counts[1], mask, N, seed_ptr, threshold, candidates, mode); });
      for (auto v : out) std::cout << int(v) << ' ';
    }
    std::cout << "|\n";
  }
}
"""


def _build_cuda_emulator(tmp_path):
    import pathlib
    import shutil
    import subprocess

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CPU emulation of csrc/topk_mask.cu")
    root = pathlib.Path(__file__).resolve().parents[1]
    src = (root / "csrc" / "topk_mask.cu").read_text()
    # The device code: everything in the anonymous namespace before the host launchers.
    body = src[src.index("namespace {") + len("namespace {"): src.index("int threads_for(")]
    for old, new in (
        ("extern __shared__ uint32_t keys[];", "uint32_t* keys = emu_shared;"),
        ("extern __shared__ uint32_t shared[];", "uint32_t* shared = emu_shared;"),
        ("__shared__ int ", "static int "),  # block-shared arrays: one block runs at a time
    ):
        assert old in body, f"csrc/topk_mask.cu changed: {old!r} not found (update the emulation)"
        body = body.replace(old, new)
    philox = (root / "csrc" / "philox.cuh").read_text()
    (tmp_path / "emu.cpp").write_text(_EMU_PRELUDE + philox + "\nnamespace fastmask {\n" + body + _EMU_MAIN)
    exe = tmp_path / "emu"
    res = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-o", str(exe), str(tmp_path / "emu.cpp")],
                         capture_output=True, text=True)
    if res.returncode != 0 and "barrier" in res.stderr:
        pytest.skip(f"{cxx} lacks C++20 <barrier>: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    return exe


@pytest.mark.slow
def test_cuda_kernel_logic_on_cpu_emulation(tmp_path):
    import subprocess

    exe = _build_cuda_emulator(tmp_path)
    g = torch.Generator().manual_seed(11)
    lines, expected = [], []
    def encode(scores, nbits):
        raw = scores.view(torch.int32 if nbits == 32 else torch.int16).flatten().tolist()
        return " ".join(str(v & (2**nbits - 1)) for v in raw)

    for dtype in (torch.float32, torch.bfloat16):
        nbits = 32 if dtype == torch.float32 else 16
        for N in (49, 300):  # one and two elements per thread (256 threads), a partial warp
            scores = tied_scores(1, N, dtype, g, levels=6).cpu()
            values = encode(scores, nbits)
            for k, largest in ((1, 1), (N // 3, 0), (N - 1, 1)):
                lines.append(f"topk {nbits} 1 {N} {values} {k} {largest}")
                expected.append(reference.topk_tokens(scores, k, bool(largest)))
            # Constant, two-valued, softmax, wide and infinite rows at random k (the select's shortcuts).
            mixed = mixed_rows(5, N, g).to(dtype)
            for k in (0, int(torch.randint(1, N, (1,), generator=g)), N):
                lines.append(f"topk {nbits} 5 {N} {encode(mixed, nbits)} {k} 1")
                expected.append(reference.topk_tokens(mixed, k, True))
            for mode, code in (("high", 0), ("low", 1), ("hint", 2)):
                candidates, seed = N // 10, 77
                # Counts as one int, per-row float32 ratios and per-row float64 ratios (the last two
                # at values whose product with N lies just below / on an integer).
                ratio = {"high": torch.tensor([0.29]), "low": torch.tensor([0.5], dtype=torch.float64)}.get(mode)
                show = torch.tensor([3 / N], dtype=torch.float64) if mode == "hint" else None
                text = lambda r, count: (f"c {count}" if r is None else  # noqa: E731
                                         f"{'d' if r.dtype == torch.float64 else 'f'} {r.item()!r}")
                lines.append(f"mask {nbits} 1 {N} {values} {seed} {2**32} {candidates} {code} "
                             f"{text(ratio, N // 2)} {text(show, 0)}")
                expected.append(reference.cls_attention_mask(
                    scores, ratio, (N // 2 + 0.5) / N, seed, mode, 1.0, (candidates + 0.5) / N, show, 0.0))
    out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
    results = out.stdout.split("|\n")[:-1]
    assert len(results) == len(expected)
    for line, got, ref in zip(lines, results, expected):
        got = torch.tensor([int(v) for v in got.split()], dtype=ref.dtype).view(ref.shape)
        assert torch.equal(got, ref), line[:30]
