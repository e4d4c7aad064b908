// ekfac_lambda on the CPU, on the rotated kept tokens (At = A Q_A [R,din], Gt = G Q_S [R,dout],
// masked tokens already dropped; example n owns rows offsets[n] .. offsets[n+1]):
//   out[o,i] = sum_n (sum_{r of n} Gt[r,o] * At[r,i])^2
//
// Register-tiled: an output tile of TM x TN entries is accumulated per example in registers (the
// micro-kernel of a GEMM whose K is that example's token count), squared and added into the
// tile's sums, which stay in registers across the examples; no [N, dout, din] tensor exists.
// Examples are taken in chunks of whole examples (~1 MiB of both operands, so a chunk stays in
// the core's L2); each chunk's tokens are packed into zero-padded panels, TM values (rows) and
// TN values (columns) per token, contiguous, so the micro-kernel streams both operands. The
// columns of the tiles run along whichever of din and dout wastes less padding (257 = 8·32 + 1
// columns would waste 11%: then the tiles are transposed, o along the columns).
//
// Work split: in each chunk every thread packs a share of the panels, then computes a fixed
// range of tiles; every output entry is summed by one thread, in example order, so results do
// not depend on the thread count (nor on the chunking).
//
// ISA: the tile loop is compiled for AVX-512 (TN = 32: two 16-float vectors), AVX2 + FMA
// (TN = 16) and the baseline, chosen at run time (__builtin_cpu_supports) or by `isa`.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace fastinf {
namespace cpu {

using namespace detail;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

struct Job {
  const float* Xp;         // packed row operand of the chunk: [nx][rows][TM]
  const float* Yp;         // packed column operand of the chunk: [ny][rows][TN]
  const int64_t* offs;     // [N + 1] row offsets of the examples
  int64_t e0, e1, r0, rows;  // the chunk: examples [e0, e1), its first row and row count
  int64_t nx, X, Y;        // row panels; extents of the row / column side of the tiles
  bool first, transposed;  // first chunk (sums start at 0); out[y, x] instead of out[x, y]
  float* out;              // [X, Y] or (transposed) [Y, X]
};

struct Kernel {
  int isa, tm, tn;
  void (*run)(const Job&, int64_t, int64_t);
};

namespace isa_base {
#include "ekfac_lambda_tiles.h"
void run(const Job& j, int64_t t0, int64_t t1) { tiles<v8, 8, 4, 1>(j, t0, t1); }
}  // namespace isa_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTINF_X86_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace isa_avx2 {
#include "ekfac_lambda_tiles.h"
void run(const Job& j, int64_t t0, int64_t t1) { tiles<v8, 8, 6, 2>(j, t0, t1); }
}  // namespace isa_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace isa_avx512 {
#include "ekfac_lambda_tiles.h"
void run(const Job& j, int64_t t0, int64_t t1) { tiles<v16, 16, 6, 2>(j, t0, t1); }
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

constexpr Kernel BASE{1, 4, 8, isa_base::run};

// The best kernel this CPU runs, no better than `isa` (0: any; 1 baseline, 2 AVX2, 3 AVX-512).
Kernel pick(int isa) {
  if (isa <= 0) isa = 3;
#ifdef FASTINF_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq");
  if (isa >= 3 && avx512) return {3, 6, 32, isa_avx512::run};
  if (isa >= 2 && avx2) return {2, 6, 16, isa_avx2::run};
#endif
  return BASE;
}

// dst[panel][r][P] = src[r0 + r][panel * P + k] (zero past `cols`), for rows [0, rows).
void pack(const float* src, int64_t ld, int64_t cols, int64_t r0, int64_t rows, int P,
          int64_t panel, float* dst) {
  const int64_t c0 = panel * P, w = std::min<int64_t>(P, cols - c0);
  float* d = dst + panel * rows * P;
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + (r0 + r) * ld + c0;
    for (int64_t k = 0; k < w; ++k) d[r * P + k] = s[k];
    for (int64_t k = w; k < P; ++k) d[r * P + k] = 0.f;
  }
}

}  // namespace

int ekfac_lambda_isa(int isa) { return pick(isa).isa; }

void ekfac_lambda_f32(const float* At, const float* Gt, const int64_t* offsets, float* out,
                      int64_t N, int64_t din, int64_t dout, int64_t chunk_rows, int isa) {
  const Kernel kern = pick(isa);
  const int TM = kern.tm, TN = kern.tn;
  const int64_t R = N ? offsets[N] : 0;
  if (R == 0 || din == 0 || dout == 0) {
    std::fill(out, out + dout * din, 0.f);
    return;
  }
  // columns along din (rows o) unless dout pads less: waste = padded columns / columns
  const bool transposed = (round_up(dout, TN) - dout) * din < (round_up(din, TN) - din) * dout;
  const float* Xs = transposed ? At : Gt;  // row side (TM values broadcast per token)
  const float* Ys = transposed ? Gt : At;  // column side (TN-float vectors per token)
  const int64_t X = transposed ? din : dout, Y = transposed ? dout : din;
  const int64_t nx = cdiv(X, TM), ny = cdiv(Y, TN);
  const int64_t width = nx * TM + ny * TN;  // packed floats per token
  if (chunk_rows <= 0) chunk_rows = std::max<int64_t>(64, (int64_t(1) << 19) / width);  // ~2 MiB
  std::vector<int64_t> chunks{0};
  for (int64_t n = 1; n < N; ++n)  // a new chunk where example n would overflow the current one
    if (offsets[n + 1] - offsets[chunks.back()] > chunk_rows) chunks.push_back(n);
  chunks.push_back(N);
  int64_t most = 0;
  for (size_t c = 0; c + 1 < chunks.size(); ++c)
    most = std::max(most, offsets[chunks[c + 1]] - offsets[chunks[c]]);
  std::vector<float> buf(static_cast<size_t>(most * width));
  float* Xp = buf.data();
  float* Yp = Xp + most * nx * TM;
  const int64_t ntiles = nx * ny;
#pragma omp parallel
  {
    int64_t tid = 0, nth = 1;
#ifdef FASTINF_OPENMP
    tid = omp_get_thread_num();
    nth = omp_get_num_threads();
#endif
    const int64_t per = cdiv(ntiles, nth);
    const int64_t t0 = std::min(ntiles, tid * per), t1 = std::min(ntiles, t0 + per);
    for (size_t c = 0; c + 1 < chunks.size(); ++c) {
      Job j{Xp, Yp, offsets, chunks[c], chunks[c + 1], offsets[chunks[c]], 0, nx, X, Y,
            c == 0, transposed, out};
      j.rows = offsets[j.e1] - j.r0;
#pragma omp for schedule(static)
      for (int64_t panel = 0; panel < nx + ny; ++panel) {
        if (panel < nx)
          pack(Xs, X, X, j.r0, j.rows, TM, panel, Xp);
        else
          pack(Ys, Y, Y, j.r0, j.rows, TN, panel - nx, Yp);
      }  // implicit barrier: the chunk is packed
      if (t0 < t1) kern.run(j, t0, t1);
#pragma omp barrier
    }
  }
}

}  // namespace cpu
}  // namespace fastinf
