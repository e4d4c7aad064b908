// Shared pieces of the pybind11 bindings. The module is deliberately torch-free: tensors arrive as
// raw data pointers (Python ints) with their shapes, already validated (dtype, device,
// contiguity, sizes) by fastinf/ops/*.py, which keeps it ABI-independent of the installed torch.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"
#ifdef FASTINF_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace fastinf {
namespace bindings {
namespace py = pybind11;

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Raises the message of a CUDA launcher (empty string = success) as a Python RuntimeError.
inline void check(const std::string& err, const char* what) {
  if (!err.empty()) throw std::runtime_error(std::string("fastinf CUDA ") + what + ": " + err);
}

// One register function per op (csrc/bindings/<op>.cpp): its CPU and, when built, CUDA entry.
void register_score_factored(py::module_& m);
void register_score_dense(py::module_& m);
void register_ekfac_lambda(py::module_& m);
void register_kron_project(py::module_& m);
void register_jl_project(py::module_& m);

}  // namespace bindings
}  // namespace fastinf
