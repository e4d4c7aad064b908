#include "bindings/common.h"

void fastinf::bindings::register_score_dense(py::module_& m) {
  m.def(
      "score_dense_cpu",
      [](uintptr_t A, uintptr_t G, uintptr_t M, uintptr_t a_mask, uintptr_t out, int64_t N,
         int64_t T, int64_t Q, int64_t din, int64_t dout) {
        py::gil_scoped_release nogil;
        cpu::score_dense_f32(ptr<const float>(A), ptr<const float>(G), ptr<const float>(M),
                             ptr<const uint8_t>(a_mask), ptr<float>(out), N, T, Q, din, dout);
      },
      py::arg("A"), py::arg("G"), py::arg("M"), py::arg("a_mask"), py::arg("out"), py::arg("N"),
      py::arg("T"), py::arg("Q"), py::arg("din"), py::arg("dout"));
#ifdef FASTINF_WITH_CUDA
  m.def(
      "score_dense_cuda",
      [](uintptr_t A, uintptr_t G, uintptr_t M, uintptr_t a_mask, uintptr_t out, int64_t N,
         int64_t T, int64_t Q, int64_t din, int64_t dout, int dtype, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = cuda::score_dense(ptr<const void>(A), ptr<const void>(G), ptr<const void>(M),
                                  ptr<const uint8_t>(a_mask), ptr<float>(out), N, T, Q, din, dout,
                                  dtype, stream);
        }
        check(err, "score_dense");
      },
      py::arg("A"), py::arg("G"), py::arg("M"), py::arg("a_mask"), py::arg("out"), py::arg("N"),
      py::arg("T"), py::arg("Q"), py::arg("din"), py::arg("dout"), py::arg("dtype"),
      py::arg("stream"));
#endif
}
