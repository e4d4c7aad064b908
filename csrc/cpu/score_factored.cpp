// score_factored on the CPU: S[n,q] = sum_{t,s} (A[n,t]·V[q,s]) (G[n,t]·U[q,s]).
#include "common.h"
#include "kernels.h"

namespace fastinf {
namespace cpu {

static inline float dot(const float* a, const float* b, int64_t k) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < k; ++i) acc += a[i] * b[i];
  return acc;
}

void score_factored_f32(const float* A, const float* G, const float* V, const float* U,
                        const uint8_t* a_mask, const uint8_t* v_mask, float* out, int64_t N,
                        int64_t T, int64_t Q, int64_t S, int64_t din, int64_t dout) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t q = 0; q < Q; ++q) {
      float acc = 0.f;
      for (int64_t t = 0; t < T; ++t) {
        if (a_mask && !a_mask[n * T + t]) continue;
        const float* a = A + (n * T + t) * din;
        const float* g = G + (n * T + t) * dout;
        for (int64_t s = 0; s < S; ++s) {
          if (v_mask && !v_mask[q * S + s]) continue;
          acc += dot(a, V + (q * S + s) * din, din) * dot(g, U + (q * S + s) * dout, dout);
        }
      }
      out[n * Q + q] = acc;
    }
  }
}

int num_threads() {
#ifdef FASTINF_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu
}  // namespace fastinf
