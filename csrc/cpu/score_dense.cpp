// score_dense on the CPU: S[n,q] = sum_t G[n,t]^T M[q] A[n,t].
//
// Fused "token" order: a GEMM with rows = kept tokens of a block of examples and columns =
// (query, output) pairs of a block of queries, Y[r,(q,o)] = M[q,o,:]·a_r, computed MR x NR tile by
// tile in registers, with an epilogue that multiplies by g_r[o] and adds into W[example][(q,o)];
// W is then reduced over o. [N,T,Q,dout] never exists; masked tokens are dropped while packing,
// so NaN in them never leaks. Deterministic (see score_factored.cpp).
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace fastinf {
namespace cpu {

using namespace detail;

namespace {

struct DenseWork {
  std::vector<const float*> ra, rg, cm;
  std::vector<int32_t> rn, co;
  Scratch pa, pm, w;
};

FASTINF_CLONES void dense_block(const float* A, const float* G, const float* M,
                                const uint8_t* a_mask, float* out, int64_t n0, int64_t n1,
                                int64_t q0, int64_t q1, int64_t T, int64_t Q, int64_t din,
                                int64_t dout, DenseWork& wk) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t q = q0; q < q1; ++q) out[n * Q + q] = 0.f;
  wk.ra.clear(); wk.rg.clear(); wk.rn.clear();
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t t = 0; t < T; ++t) {
      if (a_mask && !a_mask[n * T + t]) continue;
      wk.ra.push_back(A + (n * T + t) * din);
      wk.rg.push_back(G + (n * T + t) * dout);
      wk.rn.push_back(static_cast<int32_t>(n - n0));
    }
  const int64_t R = static_cast<int64_t>(wk.rn.size());
  if (R == 0) return;
  const int64_t C = (q1 - q0) * dout;
  wk.cm.resize(C); wk.co.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    wk.cm[c] = M + (q0 * dout + c) * din;
    wk.co[c] = static_cast<int32_t>(c % dout);
  }
  const int64_t Rp = round_up(R, MR), Cp = round_up(C, NR);
  const int64_t nb = n1 - n0;
  float* Ap = wk.pa.get(Rp * din);
  float* Mp = wk.pm.get(Cp * din);
  float* W = wk.w.get(nb * Cp);
  pack_panels<MR>(wk.ra.data(), R, din, Ap);
  pack_panels<NR>(wk.cm.data(), C, din, Mp);
  std::memset(W, 0, sizeof(float) * nb * Cp);
  const int32_t* rn = wk.rn.data();
  const float* const* rg = wk.rg.data();
  const int32_t* co = wk.co.data();

  for (int64_t c0 = 0; c0 < Cp; c0 += NR) {
    const float* mp = Mp + c0 * din;
    // The NR columns of this panel read g at consecutive o when they stay within one query.
    const bool contiguous = c0 + NR <= C && co[c0] + NR <= dout;
    const int64_t o0 = c0 < C ? co[c0] : 0;
    for (int64_t r0 = 0; r0 < Rp; r0 += MR) {
      v8 y[MR][NV];
      micro_kernel(Ap + r0 * din, mp, din, y);
      const int rows = static_cast<int>(std::min<int64_t>(MR, R - r0));
      for (int i = 0; i < rows; ++i) {
        const float* g = rg[r0 + i];
        v8 g0, g1;
        if (contiguous) {
          g0 = load8(g + o0);
          g1 = load8(g + o0 + 8);
        } else {
          alignas(32) float tmp[NR];
          for (int j = 0; j < NR; ++j) tmp[j] = c0 + j < C ? g[co[c0 + j]] : 0.f;
          g0 = load8(tmp);
          g1 = load8(tmp + 8);
        }
        float* w = W + rn[r0 + i] * Cp + c0;
        store8(w, load8(w) + g0 * y[i][0]);
        store8(w + 8, load8(w + 8) + g1 * y[i][1]);
      }
    }
  }
  for (int64_t n = 0; n < nb; ++n) {
    float* o = out + (n0 + n) * Q + q0;
    const float* w = W + n * Cp;
    for (int64_t qq = 0; qq < q1 - q0; ++qq) {
      float acc = 0.f;
      for (int64_t e = 0; e < dout; ++e) acc += w[qq * dout + e];
      o[qq] = acc;
    }
  }
}

}  // namespace

void score_dense_f32(const float* A, const float* G, const float* M, const uint8_t* a_mask,
                     float* out, int64_t N, int64_t T, int64_t Q, int64_t din, int64_t dout) {
  if (N <= 0 || Q <= 0) return;
  if (T <= 0 || dout <= 0) {
    std::fill(out, out + N * Q, 0.f);
    return;
  }
  const int64_t K = std::max<int64_t>(din, 1);
  const int64_t rows_target = std::max<int64_t>(4 * MR, (192 * 1024 / 4) / K);
  const int64_t cols_target = std::max<int64_t>(4 * NR, (256 * 1024 / 4) / K);
  int64_t nb = std::min<int64_t>(N, std::max<int64_t>(1, rows_target / T));
  int64_t qb = std::min<int64_t>(Q, std::max<int64_t>(1, cols_target / dout));
  const int64_t nt = max_threads();
  while (nt > 1 && cdiv(N, nb) * cdiv(Q, qb) < 3 * nt) {
    const bool can_n = nb > 1 && (nb / 2) * T >= 2 * MR;
    const bool can_q = qb > 1 && (qb / 2) * dout >= 2 * NR;
    if (can_n && (!can_q || nb * T * NR >= qb * dout * MR)) nb = cdiv(nb, 2);
    else if (can_q) qb = cdiv(qb, 2);
    else break;
  }
  const int64_t bn = cdiv(N, nb), bq = cdiv(Q, qb), tasks = bn * bq;
#pragma omp parallel if (tasks > 1)
  {
    DenseWork wk;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t i = task / bq, j = task % bq;
      const int64_t n0 = i * nb, q0 = j * qb;
      dense_block(A, G, M, a_mask, out, n0, std::min(N, n0 + nb), q0, std::min(Q, q0 + qb), T,
                  Q, din, dout, wk);
    }
  }
}

}  // namespace cpu
}  // namespace fastinf
