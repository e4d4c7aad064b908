// kron_project on the CPU: Y[n] = sum_t (P_out^T g_t)(P_in^T a_t)^T, [k_out, k_in] per example.
// OpenMP over examples; per token the two projections go into thread-local vectors (k_in + k_out
// floats), followed by a rank-1 update of Y[n], so memory is O(threads * (k_in + k_out)).
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace fastinf {
namespace cpu {

void kron_project_f32(const float* A, const float* G, const float* P_in, const float* P_out,
                      const uint8_t* a_mask, float* out, int64_t N, int64_t T, int64_t din,
                      int64_t dout, int64_t k_in, int64_t k_out) {
  if (N <= 0) return;
#pragma omp parallel
  {
    std::vector<float> aa(k_in), gg(k_out);
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < N; ++n) {
      float* y = out + n * k_out * k_in;
      std::fill(y, y + k_out * k_in, 0.f);
      for (int64_t t = 0; t < T; ++t) {
        if (a_mask && !a_mask[n * T + t]) continue;
        const float* a = A + (n * T + t) * din;
        const float* g = G + (n * T + t) * dout;
        std::fill(aa.begin(), aa.end(), 0.f);
        std::fill(gg.begin(), gg.end(), 0.f);
        for (int64_t d = 0; d < din; ++d) {
          const float ad = a[d];
          if (ad == 0.f) continue;
          const float* pr = P_in + d * k_in;
          float* av = aa.data();
#pragma omp simd
          for (int64_t i = 0; i < k_in; ++i) av[i] += ad * pr[i];
        }
        for (int64_t e = 0; e < dout; ++e) {
          const float ge = g[e];
          if (ge == 0.f) continue;
          const float* pr = P_out + e * k_out;
          float* gv = gg.data();
#pragma omp simd
          for (int64_t o = 0; o < k_out; ++o) gv[o] += ge * pr[o];
        }
        for (int64_t o = 0; o < k_out; ++o) {
          const float go = gg[o];
          float* yr = y + o * k_in;
          const float* av = aa.data();
#pragma omp simd
          for (int64_t i = 0; i < k_in; ++i) yr[i] += go * av[i];
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastinf
