#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#ifdef FASTINF_OPENMP
#include <omp.h>
#endif

// The 8-float helpers are always inlined; the ABI note about passing AVX vectors by value in the
// baseline clone does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// Shared pieces of the CPU kernels: an MR x NR outer-product micro-kernel on packed panels
// (GCC/Clang vector extensions, 8-float vectors), packing helpers and function multiversioning.
//
// Packed layouts (zero-padded to full panels, so the micro-kernel never sees a ragged edge):
//   row panel    Ap[k * MR + i]  (MR rows, K columns, k-major)
//   column panel Bp[k * NR + j]  (NR rows of the other operand, k-major)

namespace fastinf {
namespace cpu {
namespace detail {

// Function multiversioning: the hot per-block functions are compiled twice, for x86-64-v3
// (AVX2 + FMA) and for the baseline ISA, and picked at load time (ifunc). Never -march=native.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTINF_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTINF_CLONES
#endif
#define FASTINF_INLINE inline __attribute__((always_inline))

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned access

constexpr int MR = 6;    // rows of the register tile
constexpr int NR = 16;   // columns of the register tile (two 8-float vectors)
constexpr int NV = NR / 8;

FASTINF_INLINE v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
FASTINF_INLINE void store8(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }
FASTINF_INLINE v8 bcast(float x) { return v8{} + x; }  // scalar operands broadcast

// c[i][v] = sum_k Ap[k*MR+i] * Bp[k*NR + 8v .. 8v+7]
FASTINF_INLINE void micro_kernel(const float* __restrict Ap, const float* __restrict Bp,
                                 int64_t K, v8 (&c)[MR][NV]) {
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) c[i][v] = bcast(0.f);
  for (int64_t k = 0; k < K; ++k) {
    const v8 b0 = load8(Bp + k * NR);
    const v8 b1 = load8(Bp + k * NR + 8);
    const float* a = Ap + k * MR;
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const float ai = a[i];
      c[i][0] += ai * b0;
      c[i][1] += ai * b1;
    }
  }
}

// Packs `count` rows (pointers `rows[r]`, each of length K; nullptr = zero row) into panels of
// P rows: dst[p * K * P + k * P + i] = rows[p * P + i][k]. `count` is padded up to a multiple of P.
template <int P>
FASTINF_INLINE void pack_panels(const float* const* rows, int64_t count, int64_t K, float* dst) {
  const int64_t panels = (count + P - 1) / P;
  for (int64_t p = 0; p < panels; ++p) {
    float* d = dst + p * K * P;
    for (int i = 0; i < P; ++i) {
      const int64_t r = p * P + i;
      const float* src = r < count ? rows[r] : nullptr;
      if (src) {
        for (int64_t k = 0; k < K; ++k) d[k * P + i] = src[k];
      } else {
        for (int64_t k = 0; k < K; ++k) d[k * P + i] = 0.f;
      }
    }
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t cdiv(int64_t x, int64_t m) { return (x + m - 1) / m; }

// 64-byte aligned scratch buffer, grown on demand (one per thread and call).
struct Scratch {
  float* p = nullptr;
  size_t n = 0;
  float* get(size_t count) {
    if (count > n) {
      std::free(p);
      size_t bytes = ((count * sizeof(float)) + 63) / 64 * 64;
      p = static_cast<float*>(std::aligned_alloc(64, bytes ? bytes : 64));
      if (!p) throw std::bad_alloc();
      n = count;
    }
    return p;
  }
  ~Scratch() { std::free(p); }
};

inline int max_threads() {
#ifdef FASTINF_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace detail
}  // namespace cpu
}  // namespace fastinf
