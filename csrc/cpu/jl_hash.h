// Counter-based hash of fastinf's on-the-fly projection matrices (shared by the CPU kernels).
// Must stay bit-identical to fastinf/ops/jl_project.py, fastinf/triton/jl_project.py and
// csrc/cuda/jl_project.cu: all arithmetic mod 2^32.
#pragma once
#include <cmath>
#include <cstdint>

namespace fastinf {
namespace jl {

static inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

static inline uint32_t row_key(uint32_t key, uint32_t j) { return fmix32(j * 0x9E3779B1u + key); }

static inline uint32_t hash(uint32_t row, uint32_t i) { return fmix32((i * 0x85EBCA77u) ^ row); }

// Unscaled entry: +-1 (kind 0) or a standard normal (kind 1, Box-Muller).
static inline float entry(uint32_t h, int kind) {
  if (kind == 0) return (h >> 31) ? -1.f : 1.f;
  const float u1 = (static_cast<float>(h >> 8) + 0.5f) * (1.f / 16777216.f);
  const float u2 = static_cast<float>(fmix32(h ^ 0x27D4EB2Fu) >> 8) * (1.f / 16777216.f);
  return std::sqrt(-2.f * std::log(u1)) * std::cos(6.283185307179586f * u2);
}

}  // namespace jl
}  // namespace fastinf
