// Counter-based hash of fastinf's on-the-fly projection matrices: the one C++ definition, used by
// the CPU kernel (csrc/cpu/jl_project.cpp, also on 8-lane vectors) and the CUDA kernel
// (csrc/cuda/jl_project.cu). Must stay bit-identical to fastinf/ops/jl_project.py and
// fastinf/triton/jl_project.py: all arithmetic mod 2^32.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTINF_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FASTINF_HD inline __attribute__((always_inline))
#else
#define FASTINF_HD inline
#endif

namespace fastinf {
namespace jl {

// murmur3's finaliser; U is uint32_t or (CPU) a GCC vector of uint32_t lanes.
template <typename U>
FASTINF_HD U fmix32(U h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

FASTINF_HD uint32_t row_key(uint32_t key, uint32_t j) { return fmix32(j * 0x9E3779B1u + key); }

FASTINF_HD uint32_t hash(uint32_t row, uint32_t i) { return fmix32((i * 0x85EBCA77u) ^ row); }

// Unscaled entry: +-1 (kind 0) or a standard normal (kind 1, Box-Muller).
FASTINF_HD float entry(uint32_t h, int kind) {
  if (kind == 0) return (h >> 31) ? -1.f : 1.f;
  const float u1 = (static_cast<float>(h >> 8) + 0.5f) * (1.f / 16777216.f);
  const float u2 = static_cast<float>(fmix32(h ^ 0x27D4EB2Fu) >> 8) * (1.f / 16777216.f);
  return sqrtf(-2.f * logf(u1)) * cosf(6.283185307179586f * u2);
}

}  // namespace jl
}  // namespace fastinf
