// The Python module aquakv._C: importing it loads this library, which registers torch.ops.aquakv.*.
// It carries build information only; the ops are reached through torch.ops.
#include <pybind11/pybind11.h>

#ifndef AQUAKV_VERSION
#define AQUAKV_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "aquakv compiled kernels; the ops live under torch.ops.aquakv";
  m.attr("__version__") = AQUAKV_VERSION;
#ifdef AQUAKV_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
