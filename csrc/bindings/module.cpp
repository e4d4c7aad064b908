// pybind11 module fastinf._C: build facts, then every op's entries (csrc/bindings/<op>.cpp).
#include "bindings/common.h"

namespace fb = fastinf::bindings;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastinf compiled kernels (torch-free ABI: raw pointers, shapes, stream handles)";
  m.def("num_threads", &fastinf::cpu::num_threads, "OpenMP threads used by the CPU kernels");
#ifdef FASTINF_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
#ifdef FASTINF_WITH_CUDA
  m.attr("cuda_built") = true;
  m.def("cuda_runtime_version", &fastinf::cuda::runtime_version);
  m.def("cuda_device_count", []() {
    std::string err;
    int n = fastinf::cuda::device_count(&err);
    return pybind11::make_tuple(n, err);
  });
#else
  m.attr("cuda_built") = false;
#endif
  fb::register_score_factored(m);
  fb::register_score_dense(m);
  fb::register_ekfac_lambda(m);
  fb::register_kron_project(m);
  fb::register_jl_project(m);
}
