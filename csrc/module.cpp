// The Python module fastmask._C.  The ops themselves register into torch.ops.fastmask from each
// .cu file with TORCH_LIBRARY_FRAGMENT, so every op family lives in its own file.
#include <torch/extension.h>

TORCH_LIBRARY_FRAGMENT(fastmask, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmask CUDA kernels; call them through fastmask.ops (torch.ops.fastmask.*)";
}
