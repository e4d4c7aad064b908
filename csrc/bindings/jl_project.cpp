#include "bindings/common.h"

void fastinf::bindings::register_jl_project(py::module_& m) {
  m.def(
      "jl_project_cpu",
      [](uintptr_t X, uintptr_t out, int64_t N, int64_t p, int64_t k, uint32_t key, int kind) {
        py::gil_scoped_release nogil;
        cpu::jl_project_f32(ptr<const float>(X), ptr<float>(out), N, p, k, key, kind);
      },
      py::arg("X"), py::arg("out"), py::arg("N"), py::arg("p"), py::arg("k"), py::arg("key"),
      py::arg("kind"));
  m.def("jl_project_tile_floats", &cpu::jl_project_tile_floats,
        "floats of thread-local workspace per jl_project_cpu task");
#ifdef FASTINF_WITH_CUDA
  m.def(
      "jl_project_cuda",
      [](uintptr_t X, uintptr_t out, int64_t N, int64_t p, int64_t k, uint32_t key, int kind,
         int dtype, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = cuda::jl_project(ptr<const void>(X), ptr<float>(out), N, p, k, key, kind, dtype,
                                 stream);
        }
        check(err, "jl_project");
      },
      py::arg("X"), py::arg("out"), py::arg("N"), py::arg("p"), py::arg("k"), py::arg("key"),
      py::arg("kind"), py::arg("dtype"), py::arg("stream"));
#endif
}
