// Top-k token selection and AttMask masks from a CLS attention map: one thread block per row.
//
// Same algorithm as kernels/topk_mask.py, bit-identical to fastmask/reference.py:
//   * each score becomes a uint32 key whose unsigned order is the rank order (float order, reversed
//     for "largest"; -0.0 is folded into +0.0 first because torch sorts them as equal);
//   * "the k smallest (key, index) pairs" is answered by a most-significant-bit-first radix select
//     over the key bits below the prefix every key shares, stopping as soon as a count is exactly k,
//     then (only if it never was) over the index bits for the ties: one block-wide count per bit, so
//     the row is read from shared memory a dozen or so times for float32 CLS maps and never sorted;
//   * hints run the same select on Philox lane-0 keys (seed, b*N + n) among the candidates, which
//     orders exactly like the reference's int64 key r0 * N + n;
//   * the row gate (Philox lane 1 at offset b) is drawn first, so gated-off rows only write zeros.
// The CUDA kernels of the operators fastmask::cuda_topk_tokens / cuda_cls_attention_mask (schemas, fakes:
// fastmask/library.py).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "common.h"
#include "philox.cuh"

namespace fastmask {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / kWarp;

// uint32 key whose ascending order is the rank order of the score.  Pure integer work on the bit
// pattern: float compares could flush denormals to zero (--use_fast_math), torch keeps them apart.
template <typename scalar_t>
__device__ __forceinline__ uint32_t order_key(scalar_t value, bool largest) {
  uint32_t key;
  if constexpr (std::is_same<scalar_t, float>::value) {
    uint32_t bits = __float_as_uint(value);
    if ((bits << 1) == 0u) bits = 0u;  // -0.0 -> +0.0: torch sorts them as equal
    key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    if (largest) key = ~key;
  } else {
    // Half and bfloat16 (c10 types keep their bits in .x): order on their own 16 bits, so the
    // select needs 16 rounds instead of 32.
    uint32_t bits = value.x;
    if ((bits & 0x7FFFu) == 0u) bits = 0u;
    key = (bits & 0x8000u) ? (~bits & 0xFFFFu) : (bits | 0x8000u);
    if (largest) key ^= 0xFFFFu;
  }
  return key;
}

// Block-wide reductions of one value per thread; every thread gets the result.  The warp partials
// go to one of two shared buffers in turn, so one barrier per reduction suffices: a thread can only
// overwrite a buffer two reductions later, after a barrier every thread reaches once done reading
// it.  All threads must make the same sequence of calls (they do: the select loops are block-uniform).
struct BlockSum {
  int (*partials)[kMaxWarps];  // [2][kMaxWarps] in shared memory
  int phase = 0;
  template <typename T, typename Op>
  __device__ __forceinline__ T reduce(T value, Op op) {
    static_assert(sizeof(T) == sizeof(int), "partials hold 32-bit values");
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) value = op(value, T(__shfl_xor_sync(0xFFFFFFFFu, value, offset)));
    T* buf = reinterpret_cast<T*>(partials[phase]);
    phase ^= 1;
    if (threadIdx.x % kWarp == 0) buf[threadIdx.x / kWarp] = value;
    __syncthreads();
    T total = buf[0];
    const int num_warps = blockDim.x / kWarp;
    for (int w = 1; w < num_warps; ++w) total = op(total, buf[w]);
    return total;
  }
  __device__ __forceinline__ int operator()(int value) {
    return reduce(value, [](int a, int b) { return a + b; });
  }
};

// Selection threshold: element (key, n) is among the k smallest iff (key, n) < (key_bound, index_bound)
// lexicographically.
struct Bound {
  uint32_t key;
  uint32_t index;
  __device__ __forceinline__ bool below(uint32_t k, uint32_t n) const { return k < key || (k == key && n < index); }
};

// The k smallest (key, index) pairs among the elements where eligible(n) holds.  k <= 0 selects none,
// k >= #eligible selects all.  keys: the row in shared memory.
template <typename Eligible>
__device__ Bound smallest_k(const uint32_t* keys, int N, int64_t k, Eligible eligible, BlockSum& block_sum) {
  // Key of the k-th smallest: the largest v with count(key < v) < k, built one bit at a time from the
  // most significant.  Two shortcuts, both exact (as in kernels/topk_mask.py): start below the prefix
  // every eligible key shares (the bits above the highest one where the smallest and largest key
  // differ), and stop once count(key < trial) == k, the keys below trial being exactly the answer.
  uint32_t lo = 0xFFFFFFFFu, hi = 0u;
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    if (eligible(n)) {
      lo = min(lo, keys[n]);
      hi = max(hi, keys[n]);
    }
  }
  lo = block_sum.reduce(lo, [](uint32_t a, uint32_t b) { return min(a, b); });
  hi = block_sum.reduce(hi, [](uint32_t a, uint32_t b) { return max(a, b); });
  const uint32_t diff = lo ^ hi;
  const int top = diff == 0u ? 0 : 32 - __clz(diff);  // bits below the shared prefix
  uint32_t kth = top == 32 ? 0u : lo & ~((1u << top) - 1u);
  for (int bit = top - 1; bit >= 0; --bit) {
    const uint32_t trial = kth | (1u << bit);
    int count = 0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) count += (eligible(n) && keys[n] < trial);
    const int below = block_sum(count);
    if (below <= k) kth = trial;
    if (below == k) break;  // block-uniform: every thread saw the same total
  }
  int below = 0;
  for (int n = threadIdx.x; n < N; n += blockDim.x) below += (eligible(n) && keys[n] < kth);
  const int64_t room = k - block_sum(below);
  // Ties take the remaining room lowest index first: the largest m with count(tie, n < m) < room,
  // then every tie with n <= m is in.
  uint32_t last = 0;
  int index_bits = 1;
  while ((1 << index_bits) <= N) ++index_bits;
  if (room <= 0) return Bound{kth, 0u};
  for (int bit = index_bits - 1; bit >= 0; --bit) {
    const uint32_t trial = last | (1u << bit);
    int count = 0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) count += (eligible(n) && keys[n] == kth && uint32_t(n) < trial);
    if (block_sum(count) < room) last = trial;
  }
  return Bound{kth, last + 1};
}

template <typename scalar_t>
__global__ void topk_tokens_kernel(const scalar_t* __restrict__ scores, int64_t* __restrict__ ids, int N, int k,
                                   bool largest) {
  extern __shared__ uint32_t keys[];
  __shared__ int sum_partials[2][kMaxWarps];
  __shared__ int warp_sums[kMaxWarps];
  BlockSum block_sum{sum_partials};
  const int64_t row = blockIdx.x;
  const scalar_t* row_scores = scores + row * N;
  for (int n = threadIdx.x; n < N; n += blockDim.x) keys[n] = order_key(row_scores[n], largest);
  __syncthreads();
  const auto all = [](int) { return true; };
  const Bound bound = smallest_k(keys, N, k, all, block_sum);
  // Write the chosen indices in ascending order: a block-wide exclusive scan of the chosen flags,
  // one blockDim-wide chunk at a time (ballot within warps, warp totals through shared memory).
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, num_warps = blockDim.x / kWarp;
  int written = 0;
  for (int start = 0; start < N; start += blockDim.x) {
    const int n = start + threadIdx.x;
    const bool chosen = n < N && bound.below(keys[n], n);
    const uint32_t ballot = __ballot_sync(0xFFFFFFFFu, chosen);
    if (lane == 0) warp_sums[warp] = __popc(ballot);
    __syncthreads();
    int before = written, chunk = 0;
    for (int w = 0; w < num_warps; ++w) {
      before += w < warp ? warp_sums[w] : 0;
      chunk += warp_sums[w];
    }
    if (chosen) ids[row * k + before + __popc(ballot & ((1u << lane) - 1u))] = n;
    written += chunk;
    __syncthreads();
  }
}

enum Mode : int { kHigh = 0, kLow = 1, kHint = 2 };

// A per-row token count: floor(double(ratio[row]) * N) from a float or double [B] ratio tensor, or
// one count for every row (ratio == nullptr).  Computed in double like reference.counts_per_row, so
// the counts agree bit for bit, and here rather than in torch to spare four elementwise launches.
struct RowCount {
  const void* ratio;  // float or double, or nullptr
  int64_t stride;
  bool is_double;
  int64_t count;
  __device__ __forceinline__ int64_t at(int64_t row, int N) const {
    if (ratio == nullptr) return count;
    const double r = is_double ? static_cast<const double*>(ratio)[row * stride]
                               : double(static_cast<const float*>(ratio)[row * stride]);
    return static_cast<int64_t>(floor(r * double(N)));
  }
};

template <typename scalar_t>
__global__ void cls_attention_mask_kernel(const scalar_t* __restrict__ cls_attn, RowCount num_masked,
                                          RowCount num_shown, bool* __restrict__ mask, int N,
                                          const int64_t* __restrict__ seed_ptr, int64_t gate_threshold,
                                          int num_candidates, int mode) {
  // Read from device memory: a replayed CUDA graph uses the seed drawn in that replay.
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  extern __shared__ uint32_t shared[];
  uint32_t* keys = shared;         // attention order keys
  uint32_t* hint_keys = shared + N;  // Philox keys (hint mode only)
  __shared__ int sum_partials[2][kMaxWarps];
  BlockSum block_sum{sum_partials};
  const int64_t row = blockIdx.x;
  bool* row_mask = mask + row * N;
  // Block-uniform gate: every thread draws the same number, so the early exit is uniform.  Every
  // element of every row is written (gated-off rows as zeros): the output needs no memset.
  if (gate_threshold < (int64_t(1) << 32) &&
      !(int64_t(philox4x32(seed, static_cast<uint32_t>(row)).r1) < gate_threshold)) {
    for (int n = threadIdx.x; n < N; n += blockDim.x) row_mask[n] = false;
    return;
  }
  const scalar_t* row_attn = cls_attn + row * N;
  const bool largest = mode != kLow;
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    keys[n] = order_key(row_attn[n], largest);
    if (mode == kHint) hint_keys[n] = philox4x32(seed, static_cast<uint32_t>(row * N + n)).r0;
  }
  __syncthreads();
  const auto all = [](int) { return true; };
  const Bound hidden = smallest_k(keys, N, num_masked.at(row, N), all, block_sum);
  Bound revealed{0u, 0u}, candidate{0u, 0u};
  if (mode == kHint) {
    candidate = smallest_k(keys, N, num_candidates, all, block_sum);
    const auto is_candidate = [&](int n) { return candidate.below(keys[n], n); };
    revealed = smallest_k(hint_keys, N, num_shown.at(row, N), is_candidate, block_sum);
  }
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    bool h = hidden.below(keys[n], n);
    if (mode == kHint) h = h && !(candidate.below(keys[n], n) && revealed.below(hint_keys[n], n));
    row_mask[n] = h;
  }
}

int threads_for(int64_t N) {
  int threads = kWarp;
  while (threads < N && threads < kMaxThreads) threads *= 2;
  return threads;
}

void check_row(const at::Tensor& t, const char* name) {
  FM_CHECK_CUDA(t);
  TORCH_CHECK(t.dim() == 2, name, " must have shape [B, N], got ", t.sizes());
  TORCH_CHECK(t.size(1) < (int64_t(1) << 31), name, " rows longer than 2**31 are not supported");
}

size_t shared_bytes(int64_t N, int rows_of_keys) {
  const size_t bytes = size_t(N) * sizeof(uint32_t) * rows_of_keys;
  int device;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int limit;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= size_t(limit), "rows of ", N, " tokens need ", bytes, " bytes of shared memory; the device has ",
              limit);
  return bytes;
}

template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  }
}

// The three score types the ops accept (AT_DISPATCH_FLOATING_TYPES_AND2 would also instantiate the
// kernels for double).  fn receives a value of the element type.
template <typename Fn>
void dispatch_scores(at::ScalarType type, const char* name, Fn fn) {
  switch (type) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", type);
  }
}

at::Tensor topk_tokens(const at::Tensor& scores_in, int64_t k, bool largest) {
  check_row(scores_in, "scores");
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), N = scores.size(1);
  TORCH_CHECK(k >= 0 && k <= N, "k must lie in [0, N=", N, "], got ", k);
  at::Tensor ids = at::empty({B, k}, scores.options().dtype(at::kLong));
  if (B == 0 || k == 0) return ids;
  const c10::cuda::CUDAGuard guard(scores.device());
  const size_t smem = shared_bytes(N, 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_scores(scores.scalar_type(), "scores", [&](auto tag) {
    using scalar_t = decltype(tag);
    auto kernel = topk_tokens_kernel<scalar_t>;
    allow_shared(kernel, smem);
    kernel<<<B, threads_for(N), smem, stream>>>(scores.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), int(N), int(k),
                                                largest);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ids;
}

// A [B] float ratio tensor (float and double are read in the kernel; half/bfloat16 are widened to
// float first, exactly) or one count for every row.
RowCount row_count(const c10::optional<at::Tensor>& ratio_in, int64_t count, const at::Tensor& like, const char* name,
                   at::Tensor& keep_alive) {
  if (!ratio_in.has_value()) return RowCount{nullptr, 0, false, count};
  const int64_t B = like.size(0);
  TORCH_CHECK(ratio_in->dim() == 1 && ratio_in->size(0) == B, name, " must have shape [B]=[", B, "], got ",
              ratio_in->sizes());
  TORCH_CHECK(ratio_in->is_floating_point(), name, " must be a float tensor, got ", ratio_in->scalar_type());
  keep_alive = ratio_in->to(like.device());
  if (keep_alive.scalar_type() != at::kFloat && keep_alive.scalar_type() != at::kDouble) {
    keep_alive = keep_alive.to(at::kFloat);
  }
  return RowCount{keep_alive.data_ptr(), keep_alive.stride(0), keep_alive.scalar_type() == at::kDouble, 0};
}

// The operator's schema (fastmask/library.py): per-row ratios when given, else one ratio for every row;
// counts, gate threshold and hint pool computed as in reference.cls_attention_mask (truncation, like
// Python's int()).
at::Tensor cls_attention_mask(const at::Tensor& cls_attn_in, const c10::optional<at::Tensor>& ratio_per_row,
                              double ratio, const at::Tensor& seed, c10::string_view mode, double mask_prob,
                              double show_max, const c10::optional<at::Tensor>& show_ratio_per_row,
                              double show_ratio) {
  check_row(cls_attn_in, "cls_attn");
  FM_CHECK_CUDA(seed);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, "seed must be one int64 value");
  const at::Tensor cls_attn = cls_attn_in.contiguous();
  const int64_t B = cls_attn.size(0), N = cls_attn.size(1);
  const int64_t num_masked = static_cast<int64_t>(ratio * double(N));
  const int64_t gate_threshold = static_cast<int64_t>(mask_prob * 4294967296.0);
  const int64_t num_candidates = static_cast<int64_t>(show_max * double(N));
  int mode_id;
  if (mode == "high") {
    mode_id = kHigh;
  } else if (mode == "low") {
    mode_id = kLow;
  } else if (mode == "hint") {
    mode_id = kHint;
  } else {
    TORCH_CHECK(false, "mode must be 'high', 'low' or 'hint', got '", std::string(mode), "'");
  }
  const int64_t num_shown = mode_id == kHint ? static_cast<int64_t>(show_ratio * double(N)) : 0;
  const c10::optional<at::Tensor> show_per_row = mode_id == kHint ? show_ratio_per_row : c10::nullopt;
  if (B == 0 || N == 0 || gate_threshold <= 0) return at::zeros({B, N}, cls_attn.options().dtype(at::kBool));
  const c10::cuda::CUDAGuard guard(cls_attn.device());
  at::Tensor ratio_storage, show_storage;
  const RowCount masked = row_count(ratio_per_row, num_masked, cls_attn, "ratio", ratio_storage);
  const RowCount shown = row_count(show_per_row, num_shown, cls_attn, "show_ratio", show_storage);
  const at::Tensor seed_c = seed.contiguous();
  at::Tensor mask = at::empty({B, N}, cls_attn.options().dtype(at::kBool));  // the kernel writes every element
  const size_t smem = shared_bytes(N, mode_id == kHint ? 2 : 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_scores(cls_attn.scalar_type(), "cls_attn", [&](auto tag) {
    using scalar_t = decltype(tag);
    auto kernel = cls_attention_mask_kernel<scalar_t>;
    allow_shared(kernel, smem);
    kernel<<<B, threads_for(N), smem, stream>>>(cls_attn.data_ptr<scalar_t>(), masked, shown, mask.data_ptr<bool>(),
                                                int(N), seed_c.data_ptr<int64_t>(), gate_threshold,
                                                int(num_candidates), mode_id);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace
}  // namespace fastmask

// Schemas: fastmask/library.py (so that fakes and tracing work without this extension).
TORCH_LIBRARY_IMPL(fastmask, CUDA, m) {
  m.impl("cuda_topk_tokens", &fastmask::topk_tokens);
  m.impl("cuda_cls_attention_mask", &fastmask::cls_attention_mask);
}
