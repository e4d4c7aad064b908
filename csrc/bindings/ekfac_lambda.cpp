#include "bindings/common.h"

void fastinf::bindings::register_ekfac_lambda(py::module_& m) {
  m.def(
      "ekfac_lambda_cpu",
      [](uintptr_t At, uintptr_t Gt, uintptr_t offsets, uintptr_t out, int64_t N, int64_t din,
         int64_t dout, int64_t chunk_rows, int isa) {
        py::gil_scoped_release nogil;
        cpu::ekfac_lambda_f32(ptr<const float>(At), ptr<const float>(Gt),
                              ptr<const int64_t>(offsets), ptr<float>(out), N, din, dout,
                              chunk_rows, isa);
      },
      py::arg("At"), py::arg("Gt"), py::arg("offsets"), py::arg("out"), py::arg("N"),
      py::arg("din"), py::arg("dout"), py::arg("chunk_rows") = 0, py::arg("isa") = 0);
  m.def("ekfac_lambda_cpu_isa", &cpu::ekfac_lambda_isa, py::arg("isa") = 0,
        "The instruction set ekfac_lambda_cpu runs for `isa` here: 1 baseline, 2 AVX2+FMA, "
        "3 AVX-512 (isa 0: the best this CPU has).");
#ifdef FASTINF_WITH_CUDA
  m.def(
      "ekfac_lambda_cuda",
      [](uintptr_t At, uintptr_t Gt, uintptr_t a_mask, uintptr_t out, int64_t N, int64_t T,
         int64_t din, int64_t dout, int dtype, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = cuda::ekfac_lambda(ptr<const void>(At), ptr<const void>(Gt),
                                   ptr<const uint8_t>(a_mask), ptr<float>(out), N, T, din, dout,
                                   dtype, stream);
        }
        check(err, "ekfac_lambda");
      },
      py::arg("At"), py::arg("Gt"), py::arg("a_mask"), py::arg("out"), py::arg("N"),
      py::arg("T"), py::arg("din"), py::arg("dout"), py::arg("dtype"), py::arg("stream"));
#endif
}
