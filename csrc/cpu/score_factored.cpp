// score_factored on the CPU: S[n,q] = sum_{t,s} (A[n,t]·V[q,s]) (G[n,t]·U[q,s]).
//
// Fused "ghost" order. The kept tokens of a block of examples are rows, the kept tokens of the
// queries are columns. Both sides are packed (masked tokens dropped, so NaN in them never leaks)
// into zero-padded MR-row / NR-column panels; the query side once per call (in super-blocks of
// bounded size, shared by all threads), the example side once per row block and thread. For each
// MR x NR tile the micro-kernel computes the Gram tiles Ka = A_rows V_colsᵀ and Kg = G_rows U_colsᵀ
// in registers, and the epilogue adds Ka∘Kg row by row into W[example][column]; W is then reduced
// over the columns of each query. Nothing of size [N,T,Q,S] exists.
//
// Work split: tasks are (row block) x (chunk of whole queries), so every output entry is written
// by exactly one task. Each W entry is accumulated in token order independently of the blocking,
// so results do not depend on the thread count.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace fastinf {
namespace cpu {

using namespace detail;

namespace {

struct Rows {  // packed kept tokens of one block of examples (thread-local)
  int64_t block = -1, R = 0;
  std::vector<const float*> pa, pg;
  std::vector<int32_t> rn;  // example (within the block) of each row
  Scratch a, g, w;
};

struct Chunk {       // whole queries [q0, q1) whose kept tokens are columns [c0, c1)
  int64_t q0, q1, c0, c1, off;  // off: first packed column (multiple of NR)
};

FASTINF_CLONES void factored_tile_loop(const float* Ap, const float* Gp, const int32_t* rn,
                                       int64_t R, const float* Vp, const float* Up,
                                       int64_t C, int64_t din, int64_t dout, float* W,
                                       int64_t ldw) {
  const int64_t Rp = round_up(R, MR), Cp = round_up(C, NR);
  for (int64_t c0 = 0; c0 < Cp; c0 += NR) {
    const float* vp = Vp + c0 * din;
    const float* up = Up + c0 * dout;
    for (int64_t r0 = 0; r0 < Rp; r0 += MR) {
      v8 ka[MR][NV], kg[MR][NV];
      micro_kernel(Ap + r0 * din, vp, din, ka);
      micro_kernel(Gp + r0 * dout, up, dout, kg);
      const int rows = static_cast<int>(std::min<int64_t>(MR, R - r0));
      for (int i = 0; i < rows; ++i) {
        float* w = W + rn[r0 + i] * ldw + c0;
        store8(w, load8(w) + ka[i][0] * kg[i][0]);
        store8(w + 8, load8(w + 8) + ka[i][1] * kg[i][1]);
      }
    }
  }
}

}  // namespace

void score_factored_f32(const float* A, const float* G, const float* V, const float* U,
                        const uint8_t* a_mask, const uint8_t* v_mask, float* out, int64_t N,
                        int64_t T, int64_t Q, int64_t S, int64_t din, int64_t dout) {
  if (N <= 0 || Q <= 0) return;
  std::fill(out, out + N * Q, 0.f);
  if (T <= 0 || S <= 0) return;
  const int64_t K = std::max<int64_t>(din + dout, 1);

  // Columns: kept query tokens, in query order.
  std::vector<const float*> cv, cu;
  std::vector<int64_t> qstart(Q + 1, 0);  // first column of each query
  std::vector<int32_t> cq;
  for (int64_t q = 0; q < Q; ++q) {
    qstart[q] = static_cast<int64_t>(cv.size());
    for (int64_t s = 0; s < S; ++s) {
      if (v_mask && !v_mask[q * S + s]) continue;
      cv.push_back(V + (q * S + s) * din);
      cu.push_back(U + (q * S + s) * dout);
      cq.push_back(static_cast<int32_t>(q));
    }
  }
  qstart[Q] = static_cast<int64_t>(cv.size());
  if (cv.empty()) return;

  // Block sizes: a row block's packed A,G ~ 192 KiB (L2); a chunk ~ 256 KiB of packed V,U.
  const int64_t nt = max_threads();
  const int64_t rows_target = std::max<int64_t>(4 * MR, (192 * 1024 / 4) / K);
  int64_t cols_target = std::max<int64_t>(4 * NR, (256 * 1024 / 4) / K);
  int64_t nb = std::min<int64_t>(N, std::max<int64_t>(1, rows_target / T));
  const int64_t avg_cols = std::max<int64_t>(1, static_cast<int64_t>(cv.size()) / Q);
  // Enough tasks for the threads: split the side with more rows/columns per block, while blocks
  // still fill a few register tiles.
  while (nt > 1) {
    const int64_t qb = std::max<int64_t>(1, cols_target / avg_cols);
    if (cdiv(N, nb) * cdiv(Q, qb) >= 3 * nt) break;
    const bool can_n = nb > 1 && (nb / 2) * T >= 2 * MR;
    const bool can_q = qb > 1 && cols_target / 2 >= 2 * NR;
    if (can_n && (!can_q || nb * T * NR >= cols_target * MR)) nb = cdiv(nb, 2);
    else if (can_q) cols_target = cdiv(cols_target, 2);
    else break;
  }
  // Super-blocks of whole queries whose packed columns fit the shared buffer (64 MiB).
  const int64_t super_cols = std::max<int64_t>(cols_target, (64ll << 20) / 4 / K);

  const int64_t n_row_blocks = cdiv(N, nb);
  std::vector<Chunk> chunks;
  Scratch shared_v, shared_u;
  int64_t qs = 0;
  // Tiny problems are not worth waking the thread pool.
  const bool run_parallel = nt > 1 && 2.0 * N * T * static_cast<double>(cv.size()) * K > 2e6;
  while (qs < Q) {
    // One super-block: chunks of whole queries, each ~cols_target columns, panel-aligned.
    chunks.clear();
    int64_t q = qs, off = 0;
    while (q < Q && (chunks.empty() || qstart[q] - qstart[qs] < super_cols)) {
      int64_t q1 = q + 1;
      while (q1 < Q && qstart[q1 + 1] - qstart[q] <= cols_target) ++q1;
      chunks.push_back({q, q1, qstart[q], qstart[q1], off});
      off += round_up(qstart[q1] - qstart[q], NR);
      q = q1;
    }
    const int64_t n_chunks = static_cast<int64_t>(chunks.size());
    float* Vp = shared_v.get(off * din);
    float* Up = shared_u.get(off * dout);
    const int64_t tasks = n_row_blocks * n_chunks;
#pragma omp parallel if (run_parallel)
    {
#pragma omp for schedule(static)
      for (int64_t j = 0; j < n_chunks; ++j) {
        const Chunk& ch = chunks[j];
        pack_panels<NR>(cv.data() + ch.c0, ch.c1 - ch.c0, din, Vp + ch.off * din);
        pack_panels<NR>(cu.data() + ch.c0, ch.c1 - ch.c0, dout, Up + ch.off * dout);
      }
      Rows rw;
      // Dynamic: on a loaded machine a descheduled thread does not hold up the others. Tasks are
      // row-block-major, so consecutive tasks of a thread mostly reuse its packed rows.
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t i = task / n_chunks;
        const Chunk& ch = chunks[task % n_chunks];
        const int64_t n0 = i * nb, n1 = std::min(N, n0 + nb);
        if (rw.block != i) {  // pack this row block (kept tokens of examples n0..n1)
          rw.block = i;
          rw.pa.clear(); rw.pg.clear(); rw.rn.clear();
          for (int64_t n = n0; n < n1; ++n)
            for (int64_t t = 0; t < T; ++t) {
              if (a_mask && !a_mask[n * T + t]) continue;
              rw.pa.push_back(A + (n * T + t) * din);
              rw.pg.push_back(G + (n * T + t) * dout);
              rw.rn.push_back(static_cast<int32_t>(n - n0));
            }
          rw.R = static_cast<int64_t>(rw.rn.size());
          const int64_t Rp = round_up(rw.R, MR);
          pack_panels<MR>(rw.pa.data(), rw.R, din, rw.a.get(Rp * din + 1));
          pack_panels<MR>(rw.pg.data(), rw.R, dout, rw.g.get(Rp * dout + 1));
        }
        const int64_t C = ch.c1 - ch.c0;
        if (rw.R == 0 || C == 0) continue;
        const int64_t Cp = round_up(C, NR);
        float* W = rw.w.get((n1 - n0) * Cp);
        std::memset(W, 0, sizeof(float) * (n1 - n0) * Cp);
        factored_tile_loop(rw.a.p, rw.g.p, rw.rn.data(), rw.R, Vp + ch.off * din,
                           Up + ch.off * dout, C, din, dout, W, Cp);
        const int32_t* cqc = cq.data() + ch.c0;
        for (int64_t n = n0; n < n1; ++n) {
          float* o = out + n * Q;
          const float* w = W + (n - n0) * Cp;
          for (int64_t c = 0; c < C; ++c) o[cqc[c]] += w[c];
        }
      }
    }
    qs = q;
  }
}

int num_threads() { return max_threads(); }

}  // namespace cpu
}  // namespace fastinf
