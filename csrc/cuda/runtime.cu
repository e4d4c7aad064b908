// Device discovery for fastinf.backends(); kept apart from the kernels.
#include <cuda_runtime.h>

#include "kernels.h"

namespace fastinf {
namespace cuda {

int device_count(std::string* error) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (error) *error = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error state
    return -1;
  }
  return n;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace cuda
}  // namespace fastinf
