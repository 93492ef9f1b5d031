// The Python module of the extension. The kernels register themselves with
// TORCH_LIBRARY_FRAGMENT(prompt_kernels_cpp, m) in their own files; importing this module
// loads the shared library and so makes them reachable as torch.ops.prompt_kernels_cpp.*.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prompt_kernels C++ CPU kernels (registered as torch.ops.prompt_kernels_cpp)";
}
