#include "bindings/common.h"

void fastinf::bindings::register_kron_project(py::module_& m) {
  m.def(
      "kron_project_cpu",
      [](uintptr_t A, uintptr_t G, uintptr_t P_in, uintptr_t P_out, uintptr_t a_mask,
         uintptr_t out, int64_t N, int64_t T, int64_t din, int64_t dout, int64_t k_in,
         int64_t k_out) {
        py::gil_scoped_release nogil;
        cpu::kron_project_f32(ptr<const float>(A), ptr<const float>(G), ptr<const float>(P_in),
                              ptr<const float>(P_out), ptr<const uint8_t>(a_mask),
                              ptr<float>(out), N, T, din, dout, k_in, k_out);
      },
      py::arg("A"), py::arg("G"), py::arg("P_in"), py::arg("P_out"), py::arg("a_mask"),
      py::arg("out"), py::arg("N"), py::arg("T"), py::arg("din"), py::arg("dout"),
      py::arg("k_in"), py::arg("k_out"));
#ifdef FASTINF_WITH_CUDA
  m.def(
      "kron_project_cuda",
      [](uintptr_t A, uintptr_t G, uintptr_t P_in, uintptr_t P_out, uintptr_t a_mask,
         uintptr_t out, int64_t N, int64_t T, int64_t din, int64_t dout, int64_t k_in,
         int64_t k_out, int dtype, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = cuda::kron_project(ptr<const void>(A), ptr<const void>(G),
                                   ptr<const void>(P_in), ptr<const void>(P_out),
                                   ptr<const uint8_t>(a_mask), ptr<float>(out), N, T, din, dout,
                                   k_in, k_out, dtype, stream);
        }
        check(err, "kron_project");
      },
      py::arg("A"), py::arg("G"), py::arg("P_in"), py::arg("P_out"), py::arg("a_mask"),
      py::arg("out"), py::arg("N"), py::arg("T"), py::arg("din"), py::arg("dout"),
      py::arg("k_in"), py::arg("k_out"), py::arg("dtype"), py::arg("stream"));
#endif
}
