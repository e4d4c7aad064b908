// kron_project on CUDA: Y[n] = sum_t (P_out^T g_t)(P_in^T a_t)^T = Pg_n^T Pa_n, with
// Pg_n = G[n] P_out [T, k_out] and Pa_n = A[n] P_in [T, k_in].
// Tiled like the score engine (score_engine.cuh): a block owns a 64 x 64 tile of Y and EPB consecutive
// examples (EPB = 16 / T for T < 16, so that a step holds whole examples, else 1), 256 threads;
// thread (ty, tx) of a 16 x 16 grid owns Y[n][o0 + 4*ty + a][i0 + 4*tx + b]. The block walks
// the flattened token rows of its examples in steps of BT = 16. Per step:
//   1. projections: Pg[t][o] for its 64 columns of P_out and Pa[t][i] for its 64 columns of P_in,
//      by K loops over dout / din in steps of BK = 16 with shared-memory tiles of the token rows
//      (Xs[16 t][16 k]) and of P (Ps[16 k][64 c]), both loaded coalesced (consecutive threads,
//      consecutive addresses) and stored without bank conflicts. Thread (tt, c4) = (tid / 16,
//      4 * (tid % 16)) accumulates Pg/Pa[tt][c4 + 0..3] (a warp reads 2 Xs words in distinct banks
//      and 256 contiguous Ps bytes); the results go to shared memory.
//   2. outer products: Y += Pg^T Pa over the 16 tokens, from shared memory into 4 x 4 registers;
//      at the last row of an example (block-uniform) its Y tile is stored and the registers
//      cleared. T == 0 is a memset.
// Each projection is computed once per (token, Y tile), i.e. once per token when k_in, k_out <= 64
// (the old kernel recomputed them for every 16 x 16 tile and read P with a stride of k columns).
// Masked tokens and padding are staged as zeros (a select: masked garbage is never read). fp32
// accumulation, deterministic; every output is written once.
#include "score_engine.cuh"

namespace fastinf {
namespace cuda {
namespace {

constexpr int KT = 64;        // edge of a Y[n] tile
constexpr int BT = 16;        // tokens per step
constexpr int BK = 16;        // K step of the projections
constexpr int THREADS = 256;  // 16 x 16
static_assert(BT * BK == THREADS && BK * KT == 4 * THREADS, "staging: 1 + 4 elements per thread");

// Pj[t][c] = sum_k X[n, t0 + t, k] * P[k, c0 + c] for t < BT, c < KT (X rows [T_, D], P [D, kp]):
// this thread's 4 results (row tid / 16, columns 4 * (tid % 16) + 0..3). Ends with __syncthreads
// (the staging tiles are free again). Rows t0 + t >= T_ or masked, and k >= D, are zeros.
template <typename E>
__device__ __forceinline__ void project(float (&acc)[4], float (*Xs)[BK], float (*Ps)[KT],
                                        const E* __restrict__ X, const uint8_t* __restrict__ mask,
                                        int64_t t0, int64_t T_, int64_t D,
                                        const E* __restrict__ P, int64_t kp, int64_t c0) {
  const int tid = threadIdx.x;
  const int tt = tid / 16, c4 = 4 * (tid % 16);
#pragma unroll
  for (int q = 0; q < 4; ++q) acc[q] = 0.f;
  // this thread's staged element of the token tile: row sr, column sk (consecutive k per row)
  const int sr = tid / BK, sk = tid % BK;
  const int64_t row = t0 + sr;
  const bool row_ok = row < T_ && (mask == nullptr || mask[row] != 0);
  for (int64_t k0 = 0; k0 < D; k0 += BK) {
    float x = 0.f;
    if (row_ok && k0 + sk < D) x = to_f32(X[row * D + k0 + sk]);
    Xs[sr][sk] = x;
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // P tile: 64 consecutive columns per k row
      const int idx = tid + q * THREADS, pk = idx / KT, pc = idx % KT;
      float v = 0.f;
      if (k0 + pk < D && c0 + pc < kp) v = to_f32(P[(k0 + pk) * kp + c0 + pc]);
      Ps[pk][pc] = v;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      const float xv = Xs[tt][k];
      const float4 p4 = *reinterpret_cast<const float4*>(&Ps[k][c4]);
      acc[0] = fmaf(xv, p4.x, acc[0]);
      acc[1] = fmaf(xv, p4.y, acc[1]);
      acc[2] = fmaf(xv, p4.z, acc[2]);
      acc[3] = fmaf(xv, p4.w, acc[3]);
    }
    __syncthreads();
  }
}

template <typename E>
__global__ void __launch_bounds__(THREADS) kron_project_tiles(
    const E* __restrict__ A, const E* __restrict__ G, const E* __restrict__ P_in,
    const E* __restrict__ P_out, const uint8_t* __restrict__ a_mask, float* __restrict__ out,
    int64_t N, int64_t T_, int64_t din, int64_t dout, int64_t k_in, int64_t k_out,
    int64_t tiles_in, int64_t epb) {
  __shared__ float Xs[BT][BK];                // token rows x k
  __shared__ __align__(16) float Ps[BK][KT];  // k x projection columns
  __shared__ __align__(16) float Pg[BT][KT];  // projected G rows of this step
  __shared__ __align__(16) float Pa[BT][KT];  // projected A rows of this step
  // this block's examples [n_begin, n_end), i.e. flattened token rows [r_begin, r_end)
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * epb;
  const int64_t n_end = n_begin + epb < N ? n_begin + epb : N;
  const int64_t r_begin = n_begin * T_, r_end = n_end * T_;
  const int64_t o0 = (blockIdx.x / tiles_in) * KT;
  const int64_t i0 = (blockIdx.x % tiles_in) * KT;
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;

  float y[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) y[a][b] = 0.f;

  // this thread's outputs: Y[n][o0 + 4*ty + a][i0 + 4*tx + b] at yn[a * k_in + b], bit 4a+b of
  // `valid` set where (o, i) is inside [k_out, k_in]
  const int64_t yoff = (o0 + 4 * ty) * k_in + i0 + 4 * tx;
  unsigned valid = 0u;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
      if (o0 + 4 * ty + a < k_out && i0 + 4 * tx + b < k_in) valid |= 1u << (4 * a + b);
  int64_t n = n_begin;                 // example of the rows being summed
  int64_t next_end = r_begin + T_ - 1;  // its last row
  for (int64_t t0 = r_begin; t0 < r_end; t0 += BT) {
    float pr[4];
    project(pr, Xs, Ps, G, a_mask, t0, r_end, dout, P_out, k_out, o0);
    *reinterpret_cast<float4*>(&Pg[ty][4 * tx]) = make_float4(pr[0], pr[1], pr[2], pr[3]);
    project(pr, Xs, Ps, A, a_mask, t0, r_end, din, P_in, k_in, i0);
    *reinterpret_cast<float4*>(&Pa[ty][4 * tx]) = make_float4(pr[0], pr[1], pr[2], pr[3]);
    __syncthreads();
    // rows [t, te) of this step belong to example n; te == its last row + 1 ends the example
    for (int t = 0; t < BT;) {
      const int64_t left = next_end - t0 + 1;  // >= t + 1
      const int te = left < BT ? static_cast<int>(left) : BT;
#pragma unroll 4
      for (; t < te; ++t) {
        fma_outer4(y, *reinterpret_cast<const float4*>(&Pg[t][4 * ty]),
                   *reinterpret_cast<const float4*>(&Pa[t][4 * tx]));
      }
      if (te == left) {  // example n complete (uniform over the block): store, clear
        if (n < n_end) {
          float* yn = out + n * k_out * k_in + yoff;
#pragma unroll
          for (int a = 0; a < 4; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b)
              if ((valid >> (4 * a + b)) & 1u) yn[a * k_in + b] = y[a][b];
        }
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) y[a][b] = 0.f;
        ++n;
        next_end += T_;
      }
    }
    __syncthreads();  // before the next step rewrites Pg / Pa
  }
}

}  // namespace

std::string kron_project(const void* A, const void* G, const void* P_in, const void* P_out,
                         const uint8_t* a_mask, float* out, int64_t N, int64_t T, int64_t din,
                         int64_t dout, int64_t k_in, int64_t k_out, int dtype, uintptr_t stream) {
  if (N <= 0 || k_in <= 0 || k_out <= 0) return std::string();
  if (N > 65535) return "kron_project: N > 65535 not supported by this kernel (tile the batch)";
  const int64_t tiles_in = (k_in + KT - 1) / KT, tiles_out = (k_out + KT - 1) / KT;
  if (tiles_in * tiles_out > 2147483647LL) return "kron_project: k_in * k_out too large";
  auto st = reinterpret_cast<cudaStream_t>(stream);
  if (T <= 0) {  // no token: every Y[n] is an empty sum
    const cudaError_t err = cudaMemsetAsync(
        out, 0, static_cast<size_t>(N * k_out * k_in) * sizeof(float), st);
    if (err == cudaSuccess) return std::string();
    cudaGetLastError();
    return std::string("kron_project memset: ") + cudaGetErrorString(err);
  }
  const int64_t epb = T >= BT ? 1 : BT / T;  // examples per block: whole examples in one step
  const int64_t blocks_n = (N + epb - 1) / epb;
  return dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    dim3 grid(static_cast<unsigned>(tiles_in * tiles_out), static_cast<unsigned>(blocks_n));
    kron_project_tiles<E><<<grid, THREADS, 0, st>>>(
        static_cast<const E*>(A), static_cast<const E*>(G), static_cast<const E*>(P_in),
        static_cast<const E*>(P_out), a_mask, out, N, T, din, dout, k_in, k_out, tiles_in, epb);
    return launch_error("kron_project launch");
  });
}

}  // namespace cuda
}  // namespace fastinf
