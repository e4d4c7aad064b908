// score_dense on the CPU: S[n,q] = sum_t G[n,t]^T M[q] A[n,t].
#include "common.h"
#include "kernels.h"

namespace fastinf {
namespace cpu {

void score_dense_f32(const float* A, const float* G, const float* M, const uint8_t* a_mask,
                     float* out, int64_t N, int64_t T, int64_t Q, int64_t din, int64_t dout) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t q = 0; q < Q; ++q) {
      float acc = 0.f;
      const float* Mq = M + q * dout * din;
      for (int64_t t = 0; t < T; ++t) {
        if (a_mask && !a_mask[n * T + t]) continue;
        const float* a = A + (n * T + t) * din;
        const float* g = G + (n * T + t) * dout;
        for (int64_t o = 0; o < dout; ++o) {
          float y = 0.f;
          const float* row = Mq + o * din;
#pragma omp simd reduction(+ : y)
          for (int64_t i = 0; i < din; ++i) y += row[i] * a[i];
          acc += g[o] * y;
        }
      }
      out[n * Q + q] = acc;
    }
  }
}

}  // namespace cpu
}  // namespace fastinf
