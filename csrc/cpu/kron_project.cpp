// kron_project on the CPU: Y[n] = sum_t (P_out^T g_t)(P_in^T a_t)^T, [k_out, k_in] per example.
//
// Fused, cache-blocked GEMMs with the 6x16 register micro-kernel:
//   * P_in / P_out are packed once per call into 16-column panels (shared, read-only);
//   * each thread walks its examples in chunks of at most TB unmasked tokens (masked tokens are
//     dropped while gathering row pointers, so they are never read, NaN or not);
//   * per chunk the tokens are projected 6 rows at a time straight from A / G (row pointers,
//     no packing of A / G) into thread-local buffers laid out for the second product:
//     Ap[panel][t][16] (k-major B panel) and GpT[o][t] (rows of the left operand);
//   * per example segment of the chunk, Y[n] += GpT[:, seg] * Ap[seg, :] with the same
//     micro-kernel, while the projected tokens are still in L2.
// An example is split over chunks only at multiples of TB of its own unmasked tokens, and each
// projected row depends only on its own token, so the result does not depend on the number of
// threads or on the example blocking (deterministic).
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace fastinf {
namespace cpu {
namespace {

using namespace detail;

// c[i][v] = sum_k r_i[k] * Bp[k*NR + 8v .. 8v+7] for six row pointers r_0..r_5.
FASTINF_INLINE void mk_rows(const float* const* r, const float* __restrict Bp, int64_t K,
                            v8 (&c)[MR][NV]) {
  v8 c00 = bcast(0.f), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
     c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *r4 = r[4], *r5 = r[5];
  for (int64_t k = 0; k < K; ++k) {
    const v8 b0 = load8(Bp + k * NR);
    const v8 b1 = load8(Bp + k * NR + 8);
    v8 a;
    a = bcast(r0[k]); c00 += a * b0; c01 += a * b1;
    a = bcast(r1[k]); c10 += a * b0; c11 += a * b1;
    a = bcast(r2[k]); c20 += a * b0; c21 += a * b1;
    a = bcast(r3[k]); c30 += a * b0; c31 += a * b1;
    a = bcast(r4[k]); c40 += a * b0; c41 += a * b1;
    a = bcast(r5[k]); c50 += a * b0; c51 += a * b1;
  }
  c[0][0] = c00; c[0][1] = c01; c[1][0] = c10; c[1][1] = c11; c[2][0] = c20; c[2][1] = c21;
  c[3][0] = c30; c[3][1] = c31; c[4][0] = c40; c[4][1] = c41; c[5][0] = c50; c[5][1] = c51;
}

struct Shape {
  int64_t din, dout, k_in, k_out, kin_p, kout_p, TB;  // *_p: number of 16-column panels
};

// Packs P [d, k] into panels: dst[p * d * NR + r * NR + j] = P[r, p*NR + j] (0 past k).
void pack_cols(const float* P, int64_t d, int64_t k, float* dst) {
  const int64_t panels = cdiv(k, NR);
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t r = 0; r < d; ++r)
      for (int j = 0; j < NR; ++j) {
        const int64_t col = p * NR + j;
        dst[p * d * NR + r * NR + j] = col < k ? P[r * k + col] : 0.f;
      }
}

struct Seg {
  int64_t n, start, len;
};

// Projects the chunk's `ntok` tokens and accumulates every segment into its Y[n].
FASTINF_CLONES
void process_chunk(const Shape& s, const float* const* arows, const float* const* grows,
                   int64_t ntok, const Seg* segs, int64_t nseg, const float* Pin_p,
                   const float* Pout_p, float* Ap, float* GpT, float* out) {
  const int64_t TB = s.TB;
  v8 c[MR][NV];
  const float* r[MR];
  // 1. projections, 6 tokens at a time (the tail repeats the last token; its rows are dropped).
  for (int64_t t0 = 0; t0 < ntok; t0 += MR) {
    const int64_t m = std::min<int64_t>(MR, ntok - t0);
    for (int i = 0; i < MR; ++i) r[i] = arows[t0 + std::min<int64_t>(i, m - 1)];
    for (int64_t p = 0; p < s.kin_p; ++p) {
      mk_rows(r, Pin_p + p * s.din * NR, s.din, c);
      float* dst = Ap + p * TB * NR + t0 * NR;
      for (int64_t i = 0; i < m; ++i) {
        store8(dst + i * NR, c[i][0]);
        store8(dst + i * NR + 8, c[i][1]);
      }
    }
    for (int i = 0; i < MR; ++i) r[i] = grows[t0 + std::min<int64_t>(i, m - 1)];
    for (int64_t p = 0; p < s.kout_p; ++p) {
      mk_rows(r, Pout_p + p * s.dout * NR, s.dout, c);
      const int64_t ocount = std::min<int64_t>(NR, s.k_out - p * NR);
      for (int64_t j = 0; j < ocount; ++j) {
        float* dst = GpT + (p * NR + j) * TB + t0;
        const int v = static_cast<int>(j >> 3), l = static_cast<int>(j & 7);
        for (int64_t i = 0; i < m; ++i) dst[i] = c[i][v][l];
      }
    }
  }
  // 2. Y[n] += GpT[:, seg] Ap[seg, :] per segment.
  for (int64_t q = 0; q < nseg; ++q) {
    const Seg& sg = segs[q];
    float* y = out + sg.n * s.k_out * s.k_in;
    for (int64_t o0 = 0; o0 < s.k_out; o0 += MR) {
      const int64_t mo = std::min<int64_t>(MR, s.k_out - o0);
      for (int i = 0; i < MR; ++i) r[i] = GpT + (o0 + std::min<int64_t>(i, mo - 1)) * TB + sg.start;
      for (int64_t p = 0; p < s.kin_p; ++p) {
        mk_rows(r, Ap + p * TB * NR + sg.start * NR, sg.len, c);
        const int64_t i0 = p * NR;
        if (i0 + NR <= s.k_in) {
          for (int64_t i = 0; i < mo; ++i) {
            float* yr = y + (o0 + i) * s.k_in + i0;
            store8(yr, load8(yr) + c[i][0]);
            store8(yr + 8, load8(yr + 8) + c[i][1]);
          }
        } else {
          const int64_t nc = s.k_in - i0;
          for (int64_t i = 0; i < mo; ++i) {
            float tmp[NR];
            store8(tmp, c[i][0]);
            store8(tmp + 8, c[i][1]);
            float* yr = y + (o0 + i) * s.k_in + i0;
            for (int64_t j = 0; j < nc; ++j) yr[j] += tmp[j];
          }
        }
      }
    }
  }
}

}  // namespace

void kron_project_f32(const float* A, const float* G, const float* P_in, const float* P_out,
                      const uint8_t* a_mask, float* out, int64_t N, int64_t T, int64_t din,
                      int64_t dout, int64_t k_in, int64_t k_out) {
  if (N <= 0 || k_in <= 0 || k_out <= 0) return;
  Shape s;
  s.din = din;
  s.dout = dout;
  s.k_in = k_in;
  s.k_out = k_out;
  s.kin_p = cdiv(k_in, NR);
  s.kout_p = cdiv(k_out, NR);
  // Tokens per chunk: the projected chunk (Ap + GpT) takes about 128 KiB, so it stays in L2.
  s.TB = std::max<int64_t>(48, std::min<int64_t>(1024, 32768 / ((s.kin_p + s.kout_p) * NR)));
  const int64_t TB = s.TB;

  std::vector<float> pin_p(static_cast<size_t>(std::max<int64_t>(1, s.kin_p * din * NR)));
  std::vector<float> pout_p(static_cast<size_t>(std::max<int64_t>(1, s.kout_p * dout * NR)));
  pack_cols(P_in, din, k_in, pin_p.data());
  pack_cols(P_out, dout, k_out, pout_p.data());

  // Blocks of examples: roughly TB tokens each, but at least ~4 blocks per thread.
  const int64_t nth = max_threads();
  const int64_t nb = std::max<int64_t>(
      1, std::min<int64_t>(TB / std::max<int64_t>(T, 1), cdiv(N, 4 * nth)));
  const int64_t nblocks = cdiv(N, nb);

#pragma omp parallel
  {
    Scratch ap_s, gp_s;
    float* Ap = ap_s.get(static_cast<size_t>(s.kin_p * TB * NR));
    float* GpT = gp_s.get(static_cast<size_t>(s.kout_p * NR * TB));
    std::vector<const float*> arows(TB), grows(TB);
    std::vector<Seg> segs;
    segs.reserve(64);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t n0 = b * nb, n1 = std::min(N, n0 + nb);
      std::fill(out + n0 * k_out * k_in, out + n1 * k_out * k_in, 0.f);
      int64_t ntok = 0;
      segs.clear();
      auto flush = [&]() {
        if (ntok)
          process_chunk(s, arows.data(), grows.data(), ntok, segs.data(),
                        static_cast<int64_t>(segs.size()), pin_p.data(), pout_p.data(), Ap, GpT,
                        out);
        ntok = 0;
        segs.clear();
      };
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* mk = a_mask ? a_mask + n * T : nullptr;
        int64_t m = T;
        if (mk) {
          m = 0;
          for (int64_t t = 0; t < T; ++t) m += mk[t] != 0;
        }
        if (m == 0) continue;
        if (ntok && ntok + m > TB) flush();  // an example starts a fresh chunk if it won't fit
        for (int64_t t = 0; t < T; ++t) {
          if (mk && !mk[t]) continue;
          if (ntok == TB) flush();  // only when this example alone exceeds TB tokens
          if (segs.empty() || segs.back().n != n) segs.push_back(Seg{n, ntok, 0});
          arows[ntok] = A + (n * T + t) * din;
          grows[ntok] = G + (n * T + t) * dout;
          ++segs.back().len;
          ++ntok;
        }
      }
      flush();
    }
  }
}

}  // namespace cpu
}  // namespace fastinf
