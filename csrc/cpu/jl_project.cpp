// jl_project on the CPU: Y = X Phi^T, Phi[j,i] = entry(hash(seed, j, i)) / sqrt(k), generated on
// the fly and never stored whole.
//
// Tasks (OpenMP, dynamic) are (a slab of JS columns of Y) x (a slab of up to NT rows of X); with
// few columns of Y the rows are split too, so every thread has work. Inside a task the p axis is
// walked in blocks of IB: the [NT, IB] block of X stays in L2 while, for each 16-column slice of
// the slab, a [IB, 16] tile of Phi is generated once (vectorised hash, 8 lanes per AVX2 vector,
// written straight into the k-major panel layout) and applied to all NT rows by a register-blocked
// (up to 6 rows) x 16 micro-kernel that reads X in place. So each Phi entry is generated once per
// row slab (ceil(N / NT) times, NT = 256), not once per 64 rows, and the GEMM runs at register
// -tile intensity. Workspace per thread: one tile (IB * 16 floats = 16 KiB).
//
// Determinism: every Y element is summed in the same order (i within an IB block, then IB blocks in
// order) whatever the thread count or the slab sizes; the tasks only choose who computes it.
#include <algorithm>
#include <cmath>

#include "common.h"
#include "common/jl_hash.h"
#include "kernels.h"

namespace fastinf {
namespace cpu {

namespace {
using detail::v8;
constexpr int64_t NRJ = 16;  // columns of Y per micro-kernel (two 8-float vectors)
constexpr int64_t IB = 256;  // p-axis block: one Phi tile is [IB, 16]
constexpr int64_t NT = 256;  // max rows of X per task (the [NT, IB] block of X stays in L2)
constexpr int MRJ = 6;       // max rows of the register tile

typedef uint32_t u8v __attribute__((vector_size(32)));

// tile[ii * 16 + jj] = entry(hash(rows[jj], i0 + ii)), ii < ib (unscaled). Lanes jj past the end of
// k get harmless values that the caller never stores.
FASTINF_INLINE void gen_tile(const uint32_t* rows, int64_t i0, int64_t ib, int kind, float* tile) {
  if (kind == 0) {
    u8v r0, r1;
    __builtin_memcpy(&r0, rows, 32);
    __builtin_memcpy(&r1, rows + 8, 32);
    const u8v sign = u8v{} + 0x80000000u, one = u8v{} + 0x3F800000u;
    for (int64_t ii = 0; ii < ib; ++ii) {
      const uint32_t m = static_cast<uint32_t>(i0 + ii) * 0x85EBCA77u;
      const u8v h0 = jl::fmix32(r0 ^ m), h1 = jl::fmix32(r1 ^ m);
      const u8v f0 = (h0 & sign) | one, f1 = (h1 & sign) | one;  // +-1.0f, sign = top bit
      __builtin_memcpy(tile + ii * NRJ, &f0, 32);
      __builtin_memcpy(tile + ii * NRJ + 8, &f1, 32);
    }
  } else {
    for (int64_t ii = 0; ii < ib; ++ii)
      for (int jj = 0; jj < NRJ; ++jj)
        tile[ii * NRJ + jj] = jl::entry(jl::hash(rows[jj], static_cast<uint32_t>(i0 + ii)), 1);
  }
}

// y[r * ldy + c] (+)= sum_ii x[r * p + ii] * tile[ii * 16 + c], r < M, c < jb.
template <int M>
FASTINF_INLINE void micro(const float* __restrict x, int64_t p, const float* __restrict tile,
                          int64_t ib, float* __restrict y, int64_t ldy, int64_t jb, bool first) {
  v8 c[M][2];
  for (int r = 0; r < M; ++r) c[r][0] = c[r][1] = detail::bcast(0.f);
  for (int64_t ii = 0; ii < ib; ++ii) {
    const v8 b0 = detail::load8(tile + ii * NRJ);
    const v8 b1 = detail::load8(tile + ii * NRJ + 8);
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      const float a = x[r * p + ii];
      c[r][0] += a * b0;
      c[r][1] += a * b1;
    }
  }
  for (int r = 0; r < M; ++r) {
    float* yr = y + r * ldy;
    if (jb == NRJ) {
      if (!first) {
        c[r][0] += detail::load8(yr);
        c[r][1] += detail::load8(yr + 8);
      }
      detail::store8(yr, c[r][0]);
      detail::store8(yr + 8, c[r][1]);
    } else {
      alignas(32) float t[NRJ];
      detail::store8(t, c[r][0]);
      detail::store8(t + 8, c[r][1]);
      for (int64_t jj = 0; jj < jb; ++jj) yr[jj] = first ? t[jj] : yr[jj] + t[jj];
    }
  }
}

FASTINF_CLONES
void jl_task(const float* X, float* out, int64_t p, int64_t k, uint32_t key, int kind, int64_t n0,
             int64_t n1, int64_t j0, int64_t j1, float scale, float* tile) {
  const int64_t nrows = n1 - n0;
  const int64_t groups = (nrows + MRJ - 1) / MRJ;  // balanced groups of <= 6 rows (8 -> 4 + 4)
  for (int64_t i0 = 0; i0 < p; i0 += IB) {
    const int64_t ib = std::min(IB, p - i0);
    const bool first = i0 == 0;
    for (int64_t js = j0; js < j1; js += NRJ) {
      const int64_t jb = std::min(NRJ, j1 - js);
      alignas(32) uint32_t rows[NRJ];
      for (int jj = 0; jj < NRJ; ++jj) rows[jj] = jl::row_key(key, static_cast<uint32_t>(js + jj));
      gen_tile(rows, i0, ib, kind, tile);
      int64_t n = n0;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t m = (nrows - (n - n0) + (groups - g) - 1) / (groups - g);
        const float* x = X + n * p + i0;
        float* y = out + n * k + js;
        switch (m) {
          case 6: micro<6>(x, p, tile, ib, y, k, jb, first); break;
          case 5: micro<5>(x, p, tile, ib, y, k, jb, first); break;
          case 4: micro<4>(x, p, tile, ib, y, k, jb, first); break;
          case 3: micro<3>(x, p, tile, ib, y, k, jb, first); break;
          case 2: micro<2>(x, p, tile, ib, y, k, jb, first); break;
          default: micro<1>(x, p, tile, ib, y, k, jb, first); break;
        }
        n += m;
      }
    }
  }
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t j = j0; j < j1; ++j) out[n * k + j] *= scale;
}
}  // namespace

int64_t jl_project_tile_floats() { return IB * NRJ + NRJ; }

void jl_project_f32(const float* X, float* out, int64_t N, int64_t p, int64_t k, uint32_t key,
                    int kind) {
  if (N <= 0 || k <= 0) return;
  if (p <= 0) {
    std::fill(out, out + N * k, 0.f);
    return;
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(k));
  const int64_t T = detail::max_threads();
  // Column slabs: up to 128 columns (X block re-read from memory k / 128 times), at least 16.
  const int64_t jcols = detail::cdiv(k, NRJ);
  const int64_t js = NRJ * std::max<int64_t>(1, std::min<int64_t>(8, detail::cdiv(jcols, T)));
  const int64_t nj = detail::cdiv(k, js);
  // Row slabs: at most NT rows; more slabs when the column slabs alone can't feed the threads.
  int64_t nn = detail::cdiv(N, NT);
  if (nj * nn < T) nn = std::max(nn, std::min(detail::cdiv(N, MRJ), detail::cdiv(T, nj)));
  const int64_t nt = detail::cdiv(N, nn);
  nn = detail::cdiv(N, nt);
#pragma omp parallel
  {
    detail::Scratch scratch;
    float* tile = scratch.get(IB * NRJ);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t bj = 0; bj < nj; ++bj)
      for (int64_t bn = 0; bn < nn; ++bn)
        jl_task(X, out, p, k, key, kind, bn * nt, std::min(N, (bn + 1) * nt), bj * js,
                std::min(k, (bj + 1) * js), scale, tile);
  }
}

}  // namespace cpu
}  // namespace fastinf
