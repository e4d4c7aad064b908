#include "bindings/common.h"

void fastinf::bindings::register_score_factored(py::module_& m) {
  m.def(
      "score_factored_cpu",
      [](uintptr_t A, uintptr_t G, uintptr_t V, uintptr_t U, uintptr_t a_mask, uintptr_t v_mask,
         uintptr_t out, int64_t N, int64_t T, int64_t Q, int64_t S, int64_t din, int64_t dout) {
        py::gil_scoped_release nogil;
        cpu::score_factored_f32(ptr<const float>(A), ptr<const float>(G), ptr<const float>(V),
                                ptr<const float>(U), ptr<const uint8_t>(a_mask),
                                ptr<const uint8_t>(v_mask), ptr<float>(out), N, T, Q, S, din,
                                dout);
      },
      py::arg("A"), py::arg("G"), py::arg("V"), py::arg("U"), py::arg("a_mask"),
      py::arg("v_mask"), py::arg("out"), py::arg("N"), py::arg("T"), py::arg("Q"), py::arg("S"),
      py::arg("din"), py::arg("dout"));
#ifdef FASTINF_WITH_CUDA
  m.def(
      "score_factored_cuda",
      [](uintptr_t A, uintptr_t G, uintptr_t V, uintptr_t U, uintptr_t a_mask, uintptr_t v_mask,
         uintptr_t out, int64_t N, int64_t T, int64_t Q, int64_t S, int64_t din, int64_t dout,
         int dtype, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = cuda::score_factored(ptr<const void>(A), ptr<const void>(G), ptr<const void>(V),
                                     ptr<const void>(U), ptr<const uint8_t>(a_mask),
                                     ptr<const uint8_t>(v_mask), ptr<float>(out), N, T, Q, S,
                                     din, dout, dtype, stream);
        }
        check(err, "score_factored");
      },
      py::arg("A"), py::arg("G"), py::arg("V"), py::arg("U"), py::arg("a_mask"),
      py::arg("v_mask"), py::arg("out"), py::arg("N"), py::arg("T"), py::arg("Q"), py::arg("S"),
      py::arg("din"), py::arg("dout"), py::arg("dtype"), py::arg("stream"));
#endif
}
