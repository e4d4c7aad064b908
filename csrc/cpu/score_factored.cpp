// score_factored on the CPU: S[n,q] = sum_{t,s} (A[n,t]·V[q,s]) (G[n,t]·U[q,s]).
//
// Fused "ghost" order. The kept tokens of a block of examples are rows, the kept tokens of a
// block of queries are columns. Both operands are packed (masked tokens dropped, so NaN in them
// never leaks) into zero-padded MR-row / NR-column panels. For each MR x NR tile the micro-kernel
// computes the Gram tiles Ka = A_rows V_colsᵀ and Kg = G_rows U_colsᵀ in registers, and the
// epilogue adds Ka∘Kg row by row into W[example][column]. W is then reduced over the columns of
// each query. Nothing of size [N,T,Q,S] ever exists; scratch is bounded by the block sizes.
//
// Determinism: every output block is computed by one task, and each W entry is accumulated in
// token order independently of the blocking, so results do not depend on the thread count.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace fastinf {
namespace cpu {

using namespace detail;

namespace {

struct FactoredWork {
  std::vector<const float*> ra, rg, cv, cu;  // row / column token pointers
  std::vector<int32_t> rn, cq;               // example of each row, query of each column
  Scratch pa, pg, pv, pu, w;
};

FASTINF_CLONES void factored_block(const float* A, const float* G, const float* V,
                                   const float* U, const uint8_t* a_mask,
                                   const uint8_t* v_mask, float* out, int64_t n0, int64_t n1,
                                   int64_t q0, int64_t q1, int64_t T, int64_t Q, int64_t S,
                                   int64_t din, int64_t dout, FactoredWork& wk) {
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
  wk.cv.clear(); wk.cu.clear(); wk.cq.clear();
  for (int64_t q = q0; q < q1; ++q)
    for (int64_t s = 0; s < S; ++s) {
      if (v_mask && !v_mask[q * S + s]) continue;
      wk.cv.push_back(V + (q * S + s) * din);
      wk.cu.push_back(U + (q * S + s) * dout);
      wk.cq.push_back(static_cast<int32_t>(q - q0));
    }
  const int64_t R = static_cast<int64_t>(wk.rn.size());
  const int64_t C = static_cast<int64_t>(wk.cq.size());
  if (R == 0 || C == 0) return;
  const int64_t Rp = round_up(R, MR), Cp = round_up(C, NR);
  const int64_t nb = n1 - n0;

  float* Ap = wk.pa.get(Rp * din);
  float* Gp = wk.pg.get(Rp * dout);
  float* Vp = wk.pv.get(Cp * din);
  float* Up = wk.pu.get(Cp * dout);
  float* W = wk.w.get(nb * Cp);
  pack_panels<MR>(wk.ra.data(), R, din, Ap);
  pack_panels<MR>(wk.rg.data(), R, dout, Gp);
  pack_panels<NR>(wk.cv.data(), C, din, Vp);
  pack_panels<NR>(wk.cu.data(), C, dout, Up);
  std::memset(W, 0, sizeof(float) * nb * Cp);
  const int32_t* rn = wk.rn.data();

  for (int64_t c0 = 0; c0 < Cp; c0 += NR) {
    const float* vp = Vp + c0 * din;
    const float* up = Up + c0 * dout;
    for (int64_t r0 = 0; r0 < Rp; r0 += MR) {
      v8 ka[MR][NV], kg[MR][NV];
      micro_kernel(Ap + r0 * din, vp, din, ka);
      micro_kernel(Gp + r0 * dout, up, dout, kg);
      const int rows = static_cast<int>(std::min<int64_t>(MR, R - r0));
      for (int i = 0; i < rows; ++i) {
        float* w = W + rn[r0 + i] * Cp + c0;
        store8(w, load8(w) + ka[i][0] * kg[i][0]);
        store8(w + 8, load8(w + 8) + ka[i][1] * kg[i][1]);
      }
    }
  }
  const int32_t* cq = wk.cq.data();
  for (int64_t n = 0; n < nb; ++n) {
    float* o = out + (n0 + n) * Q + q0;
    const float* w = W + n * Cp;
    for (int64_t c = 0; c < C; ++c) o[cq[c]] += w[c];
  }
}

}  // namespace

void score_factored_f32(const float* A, const float* G, const float* V, const float* U,
                        const uint8_t* a_mask, const uint8_t* v_mask, float* out, int64_t N,
                        int64_t T, int64_t Q, int64_t S, int64_t din, int64_t dout) {
  if (N <= 0 || Q <= 0) return;
  if (T <= 0 || S <= 0) {
    std::fill(out, out + N * Q, 0.f);
    return;
  }
  // Block sizes: packed rows (A,G) of a block ~ 192 KiB, packed columns (V,U) ~ 256 KiB.
  const int64_t K = std::max<int64_t>(din + dout, 1);
  const int64_t rows_target = std::max<int64_t>(4 * MR, (192 * 1024 / 4) / K);
  const int64_t cols_target = std::max<int64_t>(4 * NR, (256 * 1024 / 4) / K);
  int64_t nb = std::min<int64_t>(N, std::max<int64_t>(1, rows_target / T));
  int64_t qb = std::min<int64_t>(Q, std::max<int64_t>(1, cols_target / S));
  // Enough tasks for the threads: split the side with more rows/columns per block, while blocks
  // still fill a few register tiles.
  const int64_t nt = max_threads();
  while (nt > 1 && cdiv(N, nb) * cdiv(Q, qb) < 3 * nt) {
    const bool can_n = nb > 1 && (nb / 2) * T >= 2 * MR;
    const bool can_q = qb > 1 && (qb / 2) * S >= 2 * NR;
    if (can_n && (!can_q || nb * T * NR >= qb * S * MR)) nb = cdiv(nb, 2);
    else if (can_q) qb = cdiv(qb, 2);
    else break;
  }
  const int64_t bn = cdiv(N, nb), bq = cdiv(Q, qb), tasks = bn * bq;
#pragma omp parallel if (tasks > 1)
  {
    FactoredWork wk;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t i = task / bq, j = task % bq;
      const int64_t n0 = i * nb, q0 = j * qb;
      factored_block(A, G, V, U, a_mask, v_mask, out, n0, std::min(N, n0 + nb), q0,
                     std::min(Q, q0 + qb), T, Q, S, din, dout, wk);
    }
  }
}

int num_threads() { return max_threads(); }

}  // namespace cpu
}  // namespace fastinf
