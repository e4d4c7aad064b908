// pybind11 module fastinf._C. Deliberately torch-free: tensors arrive as raw data pointers
// (Python ints) with their shapes, already validated (dtype, device, contiguity, sizes) by
// fastinf/ops/*.py. This keeps the module ABI-independent of the installed torch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"
#ifdef FASTINF_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace py = pybind11;
using fastinf::cpu::num_threads;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

#ifdef FASTINF_WITH_CUDA
void check(const std::string& err, const char* what) {
  if (!err.empty()) throw std::runtime_error(std::string("fastinf CUDA ") + what + ": " + err);
}
#endif

}  // namespace

void register_tracin_ops(py::module_& m);  // --- tracin ops (defined at the end of this file)

PYBIND11_MODULE(_C, m) {
  register_tracin_ops(m);
  m.doc() = "fastinf compiled kernels (torch-free ABI: raw pointers, shapes, stream handles)";

  m.def("num_threads", &num_threads, "OpenMP threads used by the CPU kernels");
#ifdef FASTINF_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif

  m.def(
      "score_factored_cpu",
      [](uintptr_t A, uintptr_t G, uintptr_t V, uintptr_t U, uintptr_t a_mask, uintptr_t v_mask,
         uintptr_t out, int64_t N, int64_t T, int64_t Q, int64_t S, int64_t din, int64_t dout) {
        py::gil_scoped_release nogil;
        fastinf::cpu::score_factored_f32(ptr<const float>(A), ptr<const float>(G),
                                         ptr<const float>(V), ptr<const float>(U),
                                         ptr<const uint8_t>(a_mask), ptr<const uint8_t>(v_mask),
                                         ptr<float>(out), N, T, Q, S, din, dout);
      },
      py::arg("A"), py::arg("G"), py::arg("V"), py::arg("U"), py::arg("a_mask"),
      py::arg("v_mask"), py::arg("out"), py::arg("N"), py::arg("T"), py::arg("Q"), py::arg("S"),
      py::arg("din"), py::arg("dout"));

  m.def(
      "score_dense_cpu",
      [](uintptr_t A, uintptr_t G, uintptr_t M, uintptr_t a_mask, uintptr_t out, int64_t N,
         int64_t T, int64_t Q, int64_t din, int64_t dout) {
        py::gil_scoped_release nogil;
        fastinf::cpu::score_dense_f32(ptr<const float>(A), ptr<const float>(G),
                                      ptr<const float>(M), ptr<const uint8_t>(a_mask),
                                      ptr<float>(out), N, T, Q, din, dout);
      },
      py::arg("A"), py::arg("G"), py::arg("M"), py::arg("a_mask"), py::arg("out"), py::arg("N"),
      py::arg("T"), py::arg("Q"), py::arg("din"), py::arg("dout"));

#ifdef FASTINF_WITH_CUDA
  m.attr("cuda_built") = true;
  m.def("cuda_runtime_version", &fastinf::cuda::runtime_version);
  m.def("cuda_device_count", []() {
    std::string err;
    int n = fastinf::cuda::device_count(&err);
    return py::make_tuple(n, err);
  });
  m.def(
      "score_factored_cuda",
      [](uintptr_t A, uintptr_t G, uintptr_t V, uintptr_t U, uintptr_t a_mask, uintptr_t v_mask,
         uintptr_t out, int64_t N, int64_t T, int64_t Q, int64_t S, int64_t din, int64_t dout,
         int dtype, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = fastinf::cuda::score_factored(ptr<const void>(A), ptr<const void>(G),
                                              ptr<const void>(V), ptr<const void>(U),
                                              ptr<const uint8_t>(a_mask),
                                              ptr<const uint8_t>(v_mask), ptr<float>(out), N, T,
                                              Q, S, din, dout, dtype, stream);
        }
        check(err, "score_factored");
      },
      py::arg("A"), py::arg("G"), py::arg("V"), py::arg("U"), py::arg("a_mask"),
      py::arg("v_mask"), py::arg("out"), py::arg("N"), py::arg("T"), py::arg("Q"), py::arg("S"),
      py::arg("din"), py::arg("dout"), py::arg("dtype"), py::arg("stream"));
  m.def(
      "score_dense_cuda",
      [](uintptr_t A, uintptr_t G, uintptr_t M, uintptr_t a_mask, uintptr_t out, int64_t N,
         int64_t T, int64_t Q, int64_t din, int64_t dout, int dtype, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = fastinf::cuda::score_dense(ptr<const void>(A), ptr<const void>(G),
                                           ptr<const void>(M), ptr<const uint8_t>(a_mask),
                                           ptr<float>(out), N, T, Q, din, dout, dtype, stream);
        }
        check(err, "score_dense");
      },
      py::arg("A"), py::arg("G"), py::arg("M"), py::arg("a_mask"), py::arg("out"), py::arg("N"),
      py::arg("T"), py::arg("Q"), py::arg("din"), py::arg("dout"), py::arg("dtype"),
      py::arg("stream"));
#else
  m.attr("cuda_built") = false;
#endif

  // --- ekfac_lambda
  m.def(
      "ekfac_lambda_cpu",
      [](uintptr_t At, uintptr_t Gt, uintptr_t a_mask, uintptr_t out, int64_t N, int64_t T,
         int64_t din, int64_t dout) {
        py::gil_scoped_release nogil;
        fastinf::cpu::ekfac_lambda_f32(ptr<const float>(At), ptr<const float>(Gt),
                                       ptr<const uint8_t>(a_mask), ptr<float>(out), N, T, din,
                                       dout);
      },
      py::arg("At"), py::arg("Gt"), py::arg("a_mask"), py::arg("out"), py::arg("N"),
      py::arg("T"), py::arg("din"), py::arg("dout"));
#ifdef FASTINF_WITH_CUDA
  m.def(
      "ekfac_lambda_cuda",
      [](uintptr_t At, uintptr_t Gt, uintptr_t a_mask, uintptr_t out, int64_t N, int64_t T,
         int64_t din, int64_t dout, int dtype, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = fastinf::cuda::ekfac_lambda(ptr<const void>(At), ptr<const void>(Gt),
                                            ptr<const uint8_t>(a_mask), ptr<float>(out), N, T,
                                            din, dout, dtype, stream);
        }
        check(err, "ekfac_lambda");
      },
      py::arg("At"), py::arg("Gt"), py::arg("a_mask"), py::arg("out"), py::arg("N"),
      py::arg("T"), py::arg("din"), py::arg("dout"), py::arg("dtype"), py::arg("stream"));
#endif
}

// --- tracin ops
void register_tracin_ops(py::module_& m) {
  m.def(
      "kron_project_cpu",
      [](uintptr_t A, uintptr_t G, uintptr_t P_in, uintptr_t P_out, uintptr_t a_mask,
         uintptr_t out, int64_t N, int64_t T, int64_t din, int64_t dout, int64_t k_in,
         int64_t k_out) {
        py::gil_scoped_release nogil;
        fastinf::cpu::kron_project_f32(ptr<const float>(A), ptr<const float>(G),
                                       ptr<const float>(P_in), ptr<const float>(P_out),
                                       ptr<const uint8_t>(a_mask), ptr<float>(out), N, T, din,
                                       dout, k_in, k_out);
      },
      py::arg("A"), py::arg("G"), py::arg("P_in"), py::arg("P_out"), py::arg("a_mask"),
      py::arg("out"), py::arg("N"), py::arg("T"), py::arg("din"), py::arg("dout"),
      py::arg("k_in"), py::arg("k_out"));
  m.def(
      "jl_project_cpu",
      [](uintptr_t X, uintptr_t out, int64_t N, int64_t p, int64_t k, uint32_t key, int kind) {
        py::gil_scoped_release nogil;
        fastinf::cpu::jl_project_f32(ptr<const float>(X), ptr<float>(out), N, p, k, key, kind);
      },
      py::arg("X"), py::arg("out"), py::arg("N"), py::arg("p"), py::arg("k"), py::arg("key"),
      py::arg("kind"));
  m.def("jl_project_tile_floats", &fastinf::cpu::jl_project_tile_floats,
        "floats of thread-local workspace per jl_project_cpu task");
#ifdef FASTINF_WITH_CUDA
  m.def(
      "kron_project_cuda",
      [](uintptr_t A, uintptr_t G, uintptr_t P_in, uintptr_t P_out, uintptr_t a_mask,
         uintptr_t out, int64_t N, int64_t T, int64_t din, int64_t dout, int64_t k_in,
         int64_t k_out, int dtype, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = fastinf::cuda::kron_project(ptr<const void>(A), ptr<const void>(G),
                                            ptr<const void>(P_in), ptr<const void>(P_out),
                                            ptr<const uint8_t>(a_mask), ptr<float>(out), N, T,
                                            din, dout, k_in, k_out, dtype, stream);
        }
        check(err, "kron_project");
      },
      py::arg("A"), py::arg("G"), py::arg("P_in"), py::arg("P_out"), py::arg("a_mask"),
      py::arg("out"), py::arg("N"), py::arg("T"), py::arg("din"), py::arg("dout"),
      py::arg("k_in"), py::arg("k_out"), py::arg("dtype"), py::arg("stream"));
  m.def(
      "jl_project_cuda",
      [](uintptr_t X, uintptr_t out, int64_t N, int64_t p, int64_t k, uint32_t key, int kind,
         int dtype, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = fastinf::cuda::jl_project(ptr<const void>(X), ptr<float>(out), N, p, k, key, kind,
                                          dtype, stream);
        }
        check(err, "jl_project");
      },
      py::arg("X"), py::arg("out"), py::arg("N"), py::arg("p"), py::arg("k"), py::arg("key"),
      py::arg("kind"), py::arg("dtype"), py::arg("stream"));
#endif
}
