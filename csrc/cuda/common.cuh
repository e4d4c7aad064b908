#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels.h"

namespace fastinf {
namespace cuda {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

inline std::string launch_error(const char* where) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return std::string();
  return std::string(where) + ": " + cudaGetErrorString(err);
}

// Calls f.template operator()<T>() with T the element type named by `dtype`.
template <typename F>
std::string dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
    default: return "unsupported dtype code " + std::to_string(dtype);
  }
}

}  // namespace cuda
}  // namespace fastinf
