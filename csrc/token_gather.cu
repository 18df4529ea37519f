// Token gather / scatter, MAE random masking and mask-token replacement: the CUDA backend.
//
// Same contract and numerics as kernels/token_gather.py and fastmask/reference.py:
//   gather_tokens(x[B,N,D], ids[B,K], pos_embed?[N,D])  -> [B,K,D]  (pos added in float32, rounded once)
//   scatter_tokens(x_kept[B,K,D], ids[B,K], N, fill?[D]) -> [B,N,D]  (rows not in ids get fill or 0)
//   apply_mask_token(x[B,N,D], mask[B,N], token[D])      -> [B,N,D]  (where(mask, token, x))
//   random_keep(seed[1], B, N, K) -> (ids_keep[B,K], mask[B,N], ids_restore[B,N]): the Philox choice of
//       reference.random_keep; the seed is read from device memory (a replayed CUDA graph uses the
//       seed drawn in that replay).
// These are the CUDA kernels of the operators fastmask::cuda_<op>, whose schemas (the ops' one schema
// without the backend), fakes and autograd are defined in Python (fastmask/library.py).
//
// The row kernels are pure copies: a warp walks one token row with the widest vector access the
// layout allows (16 bytes when the row is contiguous and aligned), threadIdx.y picks the row.
// c10/cuda only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers a bare toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common.h"
#include "philox.cuh"

namespace fastmask {
namespace {

constexpr int kRowThreads = 256;
constexpr int kKeepThreads = 256;
constexpr int kMaxKeepTokens = 16384;  // keys of one row live in shared memory (8 bytes each)

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Widest vector (in elements) that every access of a row can use: rows contiguous along D, and
// base pointer, row strides and row length all multiples of the vector size in bytes.
template <typename scalar_t>
int pick_vec(const at::Tensor& t, int64_t D) {
  if (D > 1 && t.stride(2) != 1) return 1;
  const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr());
  for (int bytes : {16, 8, 4}) {
    const int vec = bytes / static_cast<int>(sizeof(scalar_t));
    if (vec <= 1) break;
    const int64_t b = bytes;
    if (addr % b != 0 || (D * static_cast<int64_t>(sizeof(scalar_t))) % b != 0) continue;
    if ((t.stride(0) * static_cast<int64_t>(sizeof(scalar_t))) % b != 0) continue;
    if ((t.stride(1) * static_cast<int64_t>(sizeof(scalar_t))) % b != 0) continue;
    return vec;
  }
  return 1;
}

template <typename F>
void dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// threadIdx.x walks one row's vectors, threadIdx.y picks the row within the block.
struct RowLaunch {
  dim3 grid, block;
};

RowLaunch row_launch(int64_t rows, int64_t D, int vec) {
  const int64_t vecs = (D + vec - 1) / vec;
  int tx = 32;
  while (tx > 1 && tx / 2 >= vecs) tx /= 2;
  const int ty = kRowThreads / tx;
  const int64_t blocks = (rows + ty - 1) / ty;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "too many token rows for one launch");
  return {dim3(static_cast<unsigned>(blocks)), dim3(tx, ty)};
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_row_chunk(const scalar_t* row, int64_t d, int64_t stride_d) {
  Pack<scalar_t, VEC> p;
  if constexpr (VEC > 1) {
    p = *reinterpret_cast<const Pack<scalar_t, VEC>*>(row + d);  // stride_d == 1 on this path
  } else {
    p.v[0] = row[d * stride_d];
  }
  return p;
}

// out[b, k] = x[b, ids[b, k]] (+ pos[ids[b, k]] in float32, rounded once to scalar_t).  POS_VEC: the
// positional embedding is read as whole vectors of VEC elements too (16-byte loads for 16-bit pos,
// two for float32), else element by element (a strided or misaligned pos).
template <typename scalar_t, typename pos_t, int VEC, bool HAS_POS, bool POS_VEC>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ ids,
                                   const pos_t* __restrict__ pos, scalar_t* __restrict__ out, int64_t num_rows,
                                   int64_t K, int64_t D, int64_t N, int64_t sxb, int64_t sxn, int64_t sxd,
                                   int64_t spn, int64_t spd) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= num_rows) return;
  const int64_t b = row / K;
  const int64_t token = ids[row];
  scalar_t* dst = out + row * D;
  if (token < 0 || token >= N) {  // an id out of range (value checks off): a zero row, never a wild read
    Pack<scalar_t, VEC> zero;
#pragma unroll
    for (int j = 0; j < VEC; ++j) zero.v[j] = static_cast<scalar_t>(0.0f);
    for (int64_t d = static_cast<int64_t>(threadIdx.x) * VEC; d < D; d += static_cast<int64_t>(blockDim.x) * VEC) {
      *reinterpret_cast<Pack<scalar_t, VEC>*>(dst + d) = zero;
    }
    return;
  }
  const scalar_t* src = x + b * sxb + token * sxn;
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * VEC; d < D; d += static_cast<int64_t>(blockDim.x) * VEC) {
    Pack<scalar_t, VEC> p = load_row_chunk<scalar_t, VEC>(src, d, sxd);
    if constexpr (HAS_POS) {
      const pos_t* prow = pos + token * spn;
      if constexpr (POS_VEC) {
        const Pack<pos_t, VEC> q = *reinterpret_cast<const Pack<pos_t, VEC>*>(prow + d);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          p.v[j] = static_cast<scalar_t>(static_cast<float>(p.v[j]) + static_cast<float>(q.v[j]));
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          p.v[j] = static_cast<scalar_t>(static_cast<float>(p.v[j]) + static_cast<float>(prow[(d + j) * spd]));
        }
      }
    }
    *reinterpret_cast<Pack<scalar_t, VEC>*>(dst + d) = p;
  }
}

// Whether pos [N, D] can be read in vectors of `vec` elements: contiguous rows, aligned base and rows.
template <typename pos_t>
bool pos_vectorizable(const at::Tensor& pos, int vec) {
  if (vec <= 1) return false;
  const int64_t bytes = static_cast<int64_t>(vec) * static_cast<int64_t>(sizeof(pos_t));
  const auto addr = reinterpret_cast<uintptr_t>(pos.data_ptr());
  return pos.stride(1) == 1 && addr % bytes == 0 && (pos.stride(0) * static_cast<int64_t>(sizeof(pos_t))) % bytes == 0;
}

// Where each output row (b, n) of [B, N, D] comes from: a row j of the source's dim 1, or the fill.
enum class RowSource { kSlot, kMask };

// out[b, n] = src[b, j] with j = slot[b, n] (kSlot, -1 = fill) or j = n unless mask[b, n] (kMask);
// rows without a source get fill[D] (HAS_FILL) or zeros.  Every output row is written once.
template <typename scalar_t, int VEC, RowSource SOURCE, bool HAS_FILL>
__global__ void select_rows_kernel(const scalar_t* __restrict__ src, const int32_t* __restrict__ slot,
                                   const bool* __restrict__ mask, const scalar_t* __restrict__ fill,
                                   scalar_t* __restrict__ out, int64_t num_rows, int64_t N, int64_t D, int64_t ssb,
                                   int64_t ssj, int64_t ssd) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= num_rows) return;
  const int64_t b = row / N;
  int64_t j;
  if constexpr (SOURCE == RowSource::kSlot) {
    j = slot[row];
  } else {
    j = mask[row] ? -1 : row - b * N;
  }
  const scalar_t* srow = j >= 0 ? src + b * ssb + j * ssj : nullptr;
  scalar_t* dst = out + row * D;
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * VEC; d < D; d += static_cast<int64_t>(blockDim.x) * VEC) {
    Pack<scalar_t, VEC> p;
    if (srow != nullptr) {
      p = load_row_chunk<scalar_t, VEC>(srow, d, ssd);
    } else if constexpr (HAS_FILL) {
      p = load_row_chunk<scalar_t, VEC>(fill, d, 1);  // fill is a fresh contiguous [D] vector
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) p.v[i] = static_cast<scalar_t>(0.0f);
    }
    *reinterpret_cast<Pack<scalar_t, VEC>*>(dst + d) = p;
  }
}

// slot[b, n] = k where ids[b, k] == n, else -1.  One block per row b.
__global__ void token_slots_kernel(const int64_t* __restrict__ ids, int32_t* __restrict__ slot, int64_t N,
                                   int64_t K) {
  const int64_t b = blockIdx.x;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) slot[b * N + n] = -1;
  __syncthreads();  // the -1 and the k for one token may come from different threads
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t token = ids[b * K + k];
    if (token >= 0 && token < N) slot[b * N + token] = static_cast<int32_t>(k);  // out of range: dropped
  }
}

// ---------------------------------------------------------------------------------------------
// Backward kernels with the batch reductions fused (pos-embed, fill and mask-token gradients): a
// thread owns VEC channels of one token n and walks the whole batch, so each gradient row is read
// once, written once, and summed in float32 registers on the way.  threadIdx.x walks D, threadIdx.y
// picks the token within the block.
enum class BackwardKind { kGatherPos, kScatterFill, kMaskToken };

// kGatherPos:   grad_x[b, n] = g[b, slot[b, n]] (0 if slot < 0);  red[n] = sum_b grad_x[b, n]
// kScatterFill: grad_x[b, slot[b, n]] = g[b, n] for kept n;       red[block] = sum of g[b, n] over hidden
// kMaskToken:   grad_x[b, n] = mask ? 0 : g[b, n];                red[block] = sum of g[b, n] over hidden
// red is float32: [N, D] per token (kGatherPos), [blocks, D] partial sums otherwise (summed afterwards).
template <typename scalar_t, int VEC, BackwardKind KIND, bool NEED_X>
__global__ void token_backward_kernel(const scalar_t* __restrict__ g, const int32_t* __restrict__ slot,
                                      const bool* __restrict__ mask, scalar_t* __restrict__ grad_x,
                                      float* __restrict__ red, int64_t B, int64_t N, int64_t K, int64_t D,
                                      int64_t sgb, int64_t sgj, int64_t sgd) {
  extern __shared__ float block_sums[];  // [blockDim.y, blockDim.x * VEC] for the partial kinds
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t d = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool active = n < N && d < D;
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
  if (active) {
    const int64_t rows_out = KIND == BackwardKind::kScatterFill ? K : N;
#pragma unroll 4
    for (int64_t b = 0; b < B; ++b) {
      int64_t src_row = n;  // the row of g this (b, n) reads
      bool hidden = false;
      if constexpr (KIND == BackwardKind::kGatherPos) {
        src_row = slot[b * N + n];
      } else if constexpr (KIND == BackwardKind::kScatterFill) {
        hidden = slot[b * N + n] < 0;
      } else {
        hidden = mask[b * N + n];
      }
      Pack<scalar_t, VEC> p;
      if (src_row >= 0) {
        p = load_row_chunk<scalar_t, VEC>(g + b * sgb + src_row * sgj, d, sgd);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<scalar_t>(0.0f);
      }
      if constexpr (KIND == BackwardKind::kGatherPos) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += static_cast<float>(p.v[j]);
        if constexpr (NEED_X) *reinterpret_cast<Pack<scalar_t, VEC>*>(grad_x + (b * N + n) * D + d) = p;
      } else {
        if (hidden) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += static_cast<float>(p.v[j]);
        }
        if constexpr (NEED_X) {
          if constexpr (KIND == BackwardKind::kScatterFill) {
            if (!hidden) {
              *reinterpret_cast<Pack<scalar_t, VEC>*>(grad_x + (b * rows_out + slot[b * N + n]) * D + d) = p;
            }
          } else {
            if (hidden) {
#pragma unroll
              for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<scalar_t>(0.0f);
            }
            *reinterpret_cast<Pack<scalar_t, VEC>*>(grad_x + (b * N + n) * D + d) = p;
          }
        }
      }
    }
  }
  if constexpr (KIND == BackwardKind::kGatherPos) {
    if (active) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) red[n * D + d + j] = acc[j];
    }
  } else {
    // Sum the block's tokens (threadIdx.y) in shared memory, in a fixed order: deterministic.
    const int width = blockDim.x * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) block_sums[threadIdx.y * width + threadIdx.x * VEC + j] = acc[j];
    __syncthreads();
    if (threadIdx.y == 0 && d < D) {
      for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += block_sums[y * width + threadIdx.x * VEC + j];
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) red[static_cast<int64_t>(blockIdx.x) * D + d + j] = acc[j];
    }
  }
}

// Unique sort key of token n of row b: Philox lane 0 at counter b*N+n, times N, plus n.
__device__ __forceinline__ int64_t token_key(uint64_t seed, uint32_t row_base, int n, int N) {
  const uint64_t draw = philox4x32(seed, row_base + static_cast<uint32_t>(n)).r0;
  return static_cast<int64_t>(draw * static_cast<uint64_t>(N) + static_cast<uint64_t>(n));
}

// Exclusive prefix sum of one int per thread over the block (blockDim.x a multiple of 32, at most
// 1024); warp_sums is shared scratch of 32 ints.
__device__ int block_exclusive_sum(int value, int* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int total = lane < num_warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, total, offset);
      if (lane >= offset) total += up;
    }
    warp_sums[lane] = total;  // inclusive sums over warps
  }
  __syncthreads();
  return (warp > 0 ? warp_sums[warp - 1] : 0) + inclusive - value;
}

// One block per row: bitonic-sort the row's keys in shared memory, read the K-th smallest as a
// threshold (keys are unique, so exactly K tokens pass), then lay out ids_keep / ids_restore with
// a block-wide prefix sum over contiguous per-thread chunks of tokens.
__global__ void __launch_bounds__(kKeepThreads) random_keep_kernel(int64_t* __restrict__ ids_keep,
                                                                   bool* __restrict__ mask,
                                                                   int64_t* __restrict__ ids_restore,
                                                                   const int64_t* __restrict__ seed_ptr, int N, int K,
                                                                   int P) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  extern __shared__ int64_t keys[];  // P = next power of two >= N entries
  __shared__ int warp_sums[32];
  __shared__ int64_t threshold_shared;

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const uint32_t row_base = static_cast<uint32_t>(b * N);
  for (int n = tid; n < P; n += kKeepThreads) {
    keys[n] = n < N ? token_key(seed, row_base, n, N) : std::numeric_limits<int64_t>::max();
  }
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < P / 2; i += kKeepThreads) {
        const int lo = 2 * i - (i & (stride - 1));  // lower element of pair i: bit `stride` clear
        const int hi = lo + stride;
        const bool ascending = (lo & size) == 0;
        const int64_t a = keys[lo], c = keys[hi];
        if ((a > c) == ascending) {
          keys[lo] = c;
          keys[hi] = a;
        }
      }
      __syncthreads();
    }
  }
  if (tid == 0) threshold_shared = K > 0 ? keys[K - 1] : -1;
  __syncthreads();
  const int64_t threshold = threshold_shared;

  const int chunk = (N + kKeepThreads - 1) / kKeepThreads;
  const int start = min(N, tid * chunk);
  const int stop = min(N, start + chunk);
  int kept_here = 0;
  for (int n = start; n < stop; ++n) kept_here += token_key(seed, row_base, n, N) <= threshold;
  int kept_before = block_exclusive_sum(kept_here, warp_sums);
  int hidden_before = start - kept_before;
  // Kept tokens first (ascending), then hidden ones (ascending): ids_restore inverts that order.
  for (int n = start; n < stop; ++n) {
    const bool kept = token_key(seed, row_base, n, N) <= threshold;
    if (kept) {
      ids_keep[b * K + kept_before] = n;
      ids_restore[b * N + n] = kept_before++;
    } else {
      ids_restore[b * N + n] = K + hidden_before++;
    }
    mask[b * N + n] = !kept;
  }
}

void check_rows(const at::Tensor& t, const char* name) {
  FM_CHECK_CUDA(t);
  TORCH_CHECK(t.dim() == 3, name, " must be [B, rows, D]");
}

void check_ids(const at::Tensor& ids, int64_t B) {
  FM_CHECK_CUDA(ids);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B, "ids must be [B, K]");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids must be int64");
}

void check_mask(const at::Tensor& mask, int64_t B, int64_t N) {
  FM_CHECK_CUDA(mask);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B && mask.size(1) == N,
              "mask must be a [B, N] bool tensor");
}

// grad_x of a fused backward: contiguous [sizes], or an empty tensor when it is not asked for.
at::Tensor grad_x_or_empty(bool need_x, at::IntArrayRef sizes, const at::Tensor& like) {
  return need_x ? at::empty(sizes, like.options().memory_format(at::MemoryFormat::Contiguous))
                : at::empty({0}, like.options());
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& ids_in, const c10::optional<at::Tensor>& pos_in) {
  check_rows(x, "x");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  check_ids(ids_in, B);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor ids = ids_in.contiguous();
  const int64_t K = ids.size(1);
  at::Tensor out = at::empty({B, K, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  at::Tensor pos;
  if (pos_in.has_value()) {
    pos = pos_in->reshape({N, D});
    FM_CHECK_CUDA(pos);
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FM_DISPATCH_FLOATS(x.scalar_type(), "gather_tokens", [&] {
    using x_t = scalar_t;
    const int vec = pick_vec<x_t>(x, D);
    const RowLaunch launch = row_launch(B * K, D, vec);
    dispatch_vec(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      if (!pos.defined()) {
        gather_rows_kernel<x_t, x_t, VEC, false, false><<<launch.grid, launch.block, 0, stream>>>(
            x.data_ptr<x_t>(), ids.data_ptr<int64_t>(), nullptr, out.data_ptr<x_t>(), B * K, K, D, x.size(1),
            x.stride(0), x.stride(1), x.stride(2), 0, 0);
      } else {
        FM_DISPATCH_FLOATS(pos.scalar_type(), "gather_tokens_pos", [&] {
          if (pos_vectorizable<scalar_t>(pos, VEC)) {
            gather_rows_kernel<x_t, scalar_t, VEC, true, true><<<launch.grid, launch.block, 0, stream>>>(
                x.data_ptr<x_t>(), ids.data_ptr<int64_t>(), pos.data_ptr<scalar_t>(), out.data_ptr<x_t>(), B * K,
                K, D, x.size(1), x.stride(0), x.stride(1), x.stride(2), pos.stride(0), pos.stride(1));
          } else {
            gather_rows_kernel<x_t, scalar_t, VEC, true, false><<<launch.grid, launch.block, 0, stream>>>(
                x.data_ptr<x_t>(), ids.data_ptr<int64_t>(), pos.data_ptr<scalar_t>(), out.data_ptr<x_t>(), B * K,
                K, D, x.size(1), x.stride(0), x.stride(1), x.stride(2), pos.stride(0), pos.stride(1));
          }
        });
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <RowSource SOURCE>
void launch_select_rows(const at::Tensor& src, const at::Tensor& slot, const at::Tensor& mask,
                        const c10::optional<at::Tensor>& fill, at::Tensor& out) {
  const int64_t B = out.size(0), N = out.size(1), D = out.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FM_DISPATCH_FLOATS(src.scalar_type(), "select_rows", [&] {
    const int vec = pick_vec<scalar_t>(src, D);
    const RowLaunch launch = row_launch(B * N, D, vec);
    const int32_t* slot_ptr = SOURCE == RowSource::kSlot ? slot.data_ptr<int32_t>() : nullptr;
    const bool* mask_ptr = SOURCE == RowSource::kMask ? mask.data_ptr<bool>() : nullptr;
    dispatch_vec(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      if (fill.has_value()) {
        select_rows_kernel<scalar_t, VEC, SOURCE, true><<<launch.grid, launch.block, 0, stream>>>(
            src.data_ptr<scalar_t>(), slot_ptr, mask_ptr, fill->data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
            B * N, N, D, src.stride(0), src.stride(1), src.stride(2));
      } else {
        select_rows_kernel<scalar_t, VEC, SOURCE, false><<<launch.grid, launch.block, 0, stream>>>(
            src.data_ptr<scalar_t>(), slot_ptr, mask_ptr, nullptr, out.data_ptr<scalar_t>(), B * N, N, D,
            src.stride(0), src.stride(1), src.stride(2));
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

c10::optional<at::Tensor> fill_vector(const c10::optional<at::Tensor>& fill, const at::Tensor& like, int64_t D) {
  if (!fill.has_value()) return c10::nullopt;
  FM_CHECK_CUDA(*fill);
  TORCH_CHECK(fill->numel() == D, "fill/mask_token must hold D values");
  // Contiguous, in the output dtype (rounded like the reference), and 16-byte aligned for vector
  // loads: a view into the middle of another buffer gets copied.
  at::Tensor vec = fill->reshape({D}).to(like.scalar_type()).contiguous();
  if (reinterpret_cast<uintptr_t>(vec.data_ptr()) % 16 != 0) vec = vec.clone();
  return vec;
}

at::Tensor scatter_tokens_cuda(const at::Tensor& x_kept, const at::Tensor& ids_in, int64_t num_tokens,
                               const c10::optional<at::Tensor>& fill_in) {
  check_rows(x_kept, "x_kept");
  const int64_t B = x_kept.size(0), K = x_kept.size(1), D = x_kept.size(2);
  check_ids(ids_in, B);
  TORCH_CHECK(ids_in.size(1) == K, "ids and x_kept disagree on K");
  TORCH_CHECK(num_tokens >= K, "num_tokens must be >= K");
  const c10::cuda::CUDAGuard guard(x_kept.device());
  const at::Tensor ids = ids_in.contiguous();
  at::Tensor out = at::empty({B, num_tokens, D}, x_kept.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  at::Tensor slot = at::empty({B, num_tokens}, ids.options().dtype(at::kInt));
  token_slots_kernel<<<static_cast<unsigned>(B), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      ids.data_ptr<int64_t>(), slot.data_ptr<int32_t>(), num_tokens, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_select_rows<RowSource::kSlot>(x_kept, slot, at::Tensor(), fill_vector(fill_in, x_kept, D), out);
  return out;
}

at::Tensor apply_mask_token_cuda(const at::Tensor& x, const at::Tensor& mask_in, const at::Tensor& token) {
  check_rows(x, "x");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  check_mask(mask_in, B, N);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor out = at::empty({B, N, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  launch_select_rows<RowSource::kMask>(x, at::Tensor(), mask, fill_vector(token, x, D), out);
  return out;
}

// Slot map of ids (token -> kept row or -1), as the scatter forward builds it.
at::Tensor token_slots(const at::Tensor& ids, int64_t num_tokens) {
  at::Tensor slot = at::empty({ids.size(0), num_tokens}, ids.options().dtype(at::kInt));
  token_slots_kernel<<<static_cast<unsigned>(ids.size(0)), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      ids.data_ptr<int64_t>(), slot.data_ptr<int32_t>(), num_tokens, ids.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return slot;
}

// One launch of token_backward_kernel over N tokens x D channels of g; returns the float32 reduction
// buffer ([N, D] for kGatherPos, [blocks, D] partials otherwise).
template <BackwardKind KIND>
at::Tensor launch_token_backward(const at::Tensor& g, const at::Tensor& slot, const at::Tensor& mask,
                                 at::Tensor& grad_x, bool need_x, int64_t N, int64_t K) {
  const int64_t B = g.size(0), D = g.size(2);
  at::Tensor red;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FM_DISPATCH_FLOATS(g.scalar_type(), "token_backward", [&] {
    const int vec = pick_vec<scalar_t>(g, D);
    const int64_t vecs = (D + vec - 1) / vec;
    int tx = 32;
    while (tx > 1 && tx / 2 >= vecs) tx /= 2;
    // The per-token kind spreads tokens over many blocks (each thread walks the batch); the partial
    // kinds put 256 threads' tokens in a block so the [blocks, D] partials stay small.
    const int ty = KIND == BackwardKind::kGatherPos ? std::max(1, 64 / tx) : kRowThreads / tx;
    const dim3 block(tx, ty);
    const dim3 grid(static_cast<unsigned>((N + ty - 1) / ty), static_cast<unsigned>((vecs + tx - 1) / tx));
    red = KIND == BackwardKind::kGatherPos ? at::empty({N, D}, g.options().dtype(at::kFloat))
                                           : at::empty({static_cast<int64_t>(grid.x), D}, g.options().dtype(at::kFloat));
    const size_t smem = KIND == BackwardKind::kGatherPos ? 0 : sizeof(float) * ty * tx * vec;
    const int32_t* slot_ptr = slot.defined() ? slot.data_ptr<int32_t>() : nullptr;
    const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    scalar_t* gx = need_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    dispatch_vec(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      if (need_x) {
        token_backward_kernel<scalar_t, VEC, KIND, true><<<grid, block, smem, stream>>>(
            g.data_ptr<scalar_t>(), slot_ptr, mask_ptr, gx, red.data_ptr<float>(), B, N, K, D, g.stride(0),
            g.stride(1), g.stride(2));
      } else {
        token_backward_kernel<scalar_t, VEC, KIND, false><<<grid, block, smem, stream>>>(
            g.data_ptr<scalar_t>(), slot_ptr, mask_ptr, gx, red.data_ptr<float>(), B, N, K, D, g.stride(0),
            g.stride(1), g.stride(2));
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return red;
}

// Backward of gather_tokens(x, ids, pos_embed): (grad_x [B, N, D] or an empty tensor, grad_pos [N, D]
// in pos_dtype), in one pass over grad_out.
std::tuple<at::Tensor, at::Tensor> gather_tokens_backward_cuda(const at::Tensor& grad_out, const at::Tensor& ids_in,
                                                               int64_t num_tokens, bool need_x,
                                                               at::ScalarType pos_dtype) {
  check_rows(grad_out, "grad_out");
  const int64_t B = grad_out.size(0), D = grad_out.size(2);
  check_ids(ids_in, B);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor ids = ids_in.contiguous();
  at::Tensor grad_x = grad_x_or_empty(need_x, {B, num_tokens, D}, grad_out);
  if (B * num_tokens * D == 0) {
    if (need_x) grad_x.zero_();
    return {grad_x, at::zeros({num_tokens, D}, grad_out.options().dtype(pos_dtype))};
  }
  const at::Tensor slot = token_slots(ids, num_tokens);
  at::Tensor red = launch_token_backward<BackwardKind::kGatherPos>(grad_out, slot, at::Tensor(), grad_x, need_x,
                                                                  num_tokens, ids.size(1));
  return {grad_x, red.to(pos_dtype)};
}

// Backward of scatter_tokens(x_kept, ids, N, fill): (grad_x_kept [B, K, D] or empty, grad_fill [D]).
std::tuple<at::Tensor, at::Tensor> scatter_tokens_backward_cuda(const at::Tensor& grad_out, const at::Tensor& ids_in,
                                                                bool need_x, at::ScalarType fill_dtype) {
  check_rows(grad_out, "grad_out");
  const int64_t B = grad_out.size(0), N = grad_out.size(1), D = grad_out.size(2);
  check_ids(ids_in, B);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor ids = ids_in.contiguous();
  const int64_t K = ids.size(1);
  at::Tensor grad_x = grad_x_or_empty(need_x, {B, K, D}, grad_out);
  if (B * N * D == 0) return {grad_x, at::zeros({D}, grad_out.options().dtype(fill_dtype))};
  const at::Tensor slot = token_slots(ids, N);
  at::Tensor red = launch_token_backward<BackwardKind::kScatterFill>(grad_out, slot, at::Tensor(), grad_x, need_x, N, K);
  return {grad_x, red.sum(0).to(fill_dtype)};
}

// Backward of apply_mask_token(x, mask, token): (grad_x [B, N, D] or empty, grad_token [D]).
std::tuple<at::Tensor, at::Tensor> apply_mask_token_backward_cuda(const at::Tensor& grad_out, const at::Tensor& mask_in,
                                                                  bool need_x, at::ScalarType token_dtype) {
  check_rows(grad_out, "grad_out");
  const int64_t B = grad_out.size(0), N = grad_out.size(1), D = grad_out.size(2);
  check_mask(mask_in, B, N);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor grad_x = grad_x_or_empty(need_x, {B, N, D}, grad_out);
  if (B * N * D == 0) return {grad_x, at::zeros({D}, grad_out.options().dtype(token_dtype))};
  at::Tensor red = launch_token_backward<BackwardKind::kMaskToken>(grad_out, at::Tensor(), mask, grad_x, need_x, N, N);
  return {grad_x, red.sum(0).to(token_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_keep_cuda(const at::Tensor& seed, int64_t B, int64_t N,
                                                               int64_t K) {
  FM_CHECK_CUDA(seed);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, "seed must be one int64 value");
  TORCH_CHECK(B >= 0 && N >= 0 && K >= 0 && K <= N, "random_keep needs 0 <= keep <= num_tokens, got keep=", K,
              " of ", N);
  TORCH_CHECK(N <= kMaxKeepTokens, "random_keep supports rows of at most ", kMaxKeepTokens, " tokens, got ", N);
  TORCH_CHECK(B * N < (int64_t{1} << 31), "random_keep uses one 32-bit Philox counter per token: B*N < 2**31");
  const auto options = seed.options();
  at::Tensor ids_keep = at::empty({B, K}, options);
  at::Tensor mask = at::empty({B, N}, options.dtype(at::kBool));
  at::Tensor ids_restore = at::empty({B, N}, options);
  if (B == 0 || N == 0) return {ids_keep, mask, ids_restore};
  const c10::cuda::CUDAGuard guard(seed.device());
  const at::Tensor seed_c = seed.contiguous();
  int P = 1;
  while (P < N) P <<= 1;
  const size_t smem = static_cast<size_t>(P) * sizeof(int64_t);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(random_keep_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  random_keep_kernel<<<static_cast<unsigned>(B), kKeepThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      ids_keep.data_ptr<int64_t>(), mask.data_ptr<bool>(), ids_restore.data_ptr<int64_t>(),
      seed_c.data_ptr<int64_t>(), static_cast<int>(N), static_cast<int>(K), P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ids_keep, mask, ids_restore};
}

}  // namespace
}  // namespace fastmask

// Schemas: fastmask/library.py (so that fakes and tracing work without this extension).
TORCH_LIBRARY_IMPL(fastmask, CUDA, m) {
  m.impl("cuda_gather_tokens", &fastmask::gather_tokens_cuda);
  m.impl("cuda_scatter_tokens", &fastmask::scatter_tokens_cuda);
  m.impl("cuda_apply_mask_token", &fastmask::apply_mask_token_cuda);
  m.impl("cuda_random_keep", &fastmask::random_keep_cuda);
  // The fused backwards (grad_x is an empty tensor when need_x is False); their schemas and fakes are
  // defined in fastmask/library.py, as fastmask::cuda_<op>.
  m.impl("cuda_gather_tokens_backward", &fastmask::gather_tokens_backward_cuda);
  m.impl("cuda_scatter_tokens_backward", &fastmask::scatter_tokens_backward_cuda);
  m.impl("cuda_apply_mask_token_backward", &fastmask::apply_mask_token_backward_cuda);
}
