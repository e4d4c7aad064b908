// ekfac_lambda on the CPU, on rotated factors At = A Q_A [N,T,din], Gt = G Q_S [N,T,dout]:
//   out[o,i] = sum_n (sum_t Gt[n,t,o] * At[n,t,i])^2
// Each thread owns a tile (one row o, a block of columns i) of the output and loops over all
// examples in order, so the result is deterministic for any thread count.
#include <algorithm>

#include "common.h"
#include "kernels.h"

namespace fastinf {
namespace cpu {

void ekfac_lambda_f32(const float* At, const float* Gt, const uint8_t* a_mask, float* out,
                      int64_t N, int64_t T, int64_t din, int64_t dout) {
  constexpr int64_t BI = 128;
  const int64_t nib = (din + BI - 1) / BI;
#pragma omp parallel for schedule(static)
  for (int64_t tile = 0; tile < dout * nib; ++tile) {
    const int64_t o = tile / nib;
    const int64_t i0 = (tile % nib) * BI;
    const int64_t ni = std::min(BI, din - i0);
    float acc[BI];
    float r[BI];
    for (int64_t i = 0; i < ni; ++i) acc[i] = 0.f;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t i = 0; i < ni; ++i) r[i] = 0.f;
      for (int64_t t = 0; t < T; ++t) {
        if (a_mask && !a_mask[n * T + t]) continue;
        const float g = Gt[(n * T + t) * dout + o];
        const float* a = At + (n * T + t) * din + i0;
#pragma omp simd
        for (int64_t i = 0; i < ni; ++i) r[i] += g * a[i];
      }
#pragma omp simd
      for (int64_t i = 0; i < ni; ++i) acc[i] += r[i] * r[i];
    }
    float* dst = out + o * din + i0;
    for (int64_t i = 0; i < ni; ++i) dst[i] = acc[i];
  }
}

}  // namespace cpu
}  // namespace fastinf
