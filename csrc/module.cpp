// The Python module fastmask._C.  Each .cu file registers the CUDA kernels of its operators
// fastmask::cuda_<op> (TORCH_LIBRARY_IMPL); their schemas and fakes are defined in Python
// (fastmask/library.py), so tracing works whether or not this extension is built.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmask CUDA kernels; call them through fastmask.ops (torch.ops.fastmask.*)";
}
