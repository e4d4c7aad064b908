// jl_project on the CPU: Y = X Phi^T, Phi[j,i] = entry(hash(seed, j, i)) / sqrt(k), generated on
// the fly. Blocked GEMM: OpenMP over (rows of Y) x (columns of Y) tiles; each task walks the
// p axis in blocks, generating its [JB, IB] tile of Phi into a thread-local buffer (16 KiB-64 KiB),
// so memory is O(threads * JB * IB) whatever k and p.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "jl_hash.h"
#include "kernels.h"

namespace fastinf {
namespace cpu {

namespace {
constexpr int64_t JB = 16;   // rows of Phi (columns of Y) per task
constexpr int64_t IB = 512;  // columns of Phi (the contraction axis) per tile
constexpr int64_t NB = 64;   // rows of X per task
}  // namespace

int64_t jl_project_tile_floats() { return JB * IB + NB * JB; }

void jl_project_f32(const float* X, float* out, int64_t N, int64_t p, int64_t k, uint32_t key,
                    int kind) {
  if (N <= 0 || p <= 0 || k <= 0) return;
  const int64_t nj = (k + JB - 1) / JB, nn = (N + NB - 1) / NB;
  const float scale = 1.f / std::sqrt(static_cast<float>(k));
#pragma omp parallel
  {
    std::vector<float> tile(JB * IB);
    std::vector<float> acc(NB * JB);
    uint32_t rows[JB];
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t bj = 0; bj < nj; ++bj) {
      for (int64_t bn = 0; bn < nn; ++bn) {
        const int64_t j0 = bj * JB, j1 = std::min(k, j0 + JB), jb = j1 - j0;
        const int64_t n0 = bn * NB, n1 = std::min(N, n0 + NB);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t jj = 0; jj < jb; ++jj) rows[jj] = jl::row_key(key, static_cast<uint32_t>(j0 + jj));
        for (int64_t i0 = 0; i0 < p; i0 += IB) {
          const int64_t ib = std::min(IB, p - i0);
          for (int64_t jj = 0; jj < jb; ++jj) {
            float* t = tile.data() + jj * IB;
            const uint32_t r = rows[jj];
            if (kind == 0) {
#pragma omp simd
              for (int64_t ii = 0; ii < ib; ++ii) {
                const uint32_t h = jl::hash(r, static_cast<uint32_t>(i0 + ii));
                t[ii] = (h >> 31) ? -1.f : 1.f;
              }
            } else {
              for (int64_t ii = 0; ii < ib; ++ii)
                t[ii] = jl::entry(jl::hash(r, static_cast<uint32_t>(i0 + ii)), 1);
            }
          }
          for (int64_t n = n0; n < n1; ++n) {
            const float* x = X + n * p + i0;
            float* a = acc.data() + (n - n0) * JB;
            int64_t jj = 0;
            for (; jj + 4 <= jb; jj += 4) {  // 4 rows of the tile per sweep: x loaded once
              const float* t0 = tile.data() + jj * IB;
              const float* t1 = t0 + IB;
              const float* t2 = t1 + IB;
              const float* t3 = t2 + IB;
              float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
              for (int64_t ii = 0; ii < ib; ++ii) {
                const float xv = x[ii];
                s0 += xv * t0[ii];
                s1 += xv * t1[ii];
                s2 += xv * t2[ii];
                s3 += xv * t3[ii];
              }
              a[jj] += s0;
              a[jj + 1] += s1;
              a[jj + 2] += s2;
              a[jj + 3] += s3;
            }
            for (; jj < jb; ++jj) {
              const float* t = tile.data() + jj * IB;
              float s = 0.f;
#pragma omp simd reduction(+ : s)
              for (int64_t ii = 0; ii < ib; ++ii) s += x[ii] * t[ii];
              a[jj] += s;
            }
          }
        }
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t jj = 0; jj < jb; ++jj) out[n * k + j0 + jj] = acc[(n - n0) * JB + jj] * scale;
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastinf
