// Shared helpers for fastmask's CUDA kernels.
#pragma once
// ATen + the op registry only: torch/extension.h drags in pybind11 and the whole C++ frontend,
// which doubles nvcc time for every .cu file.
#include <ATen/ATen.h>
#include <torch/library.h>

#define FM_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define FM_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define FM_CHECK_INPUT(x) \
  FM_CHECK_CUDA(x);       \
  FM_CHECK_CONTIGUOUS(x)

// Dispatch over the three float types the ops accept.
#define FM_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)
