// Shared CUDA plumbing of fastinf: dtype dispatch, launch checking, and the tiled "token Gram"
// engine that both score ops are built on.
//
// ---------------------------------------------------------------------------------------------
// The token Gram engine
// ---------------------------------------------------------------------------------------------
// Both ops reduce a product of token-level matrices over (example, query) blocks:
//
//   score_factored: rows r = (n, t) of A|G flattened to [N*T, *], columns c = (q, s) of V|U
//                   flattened to [Q*S, *];  P[r, c] = (A[r]·V[c]) * (G[r]·U[c])
//   score_dense:    rows r = (n, t) of A|G, columns c = (q, o) of M flattened to [Q*dout, din];
//                   P[r, c] = (A[r]·M[c]) * G[r, o]
//
//   out[n, q] = sum of P[r, c] over the T rows of example n and the S (resp. dout) columns of q.
//
// Rows are grouped in runs of T ("row segments", one per example) and columns in runs of SEG
// (S or dout, one per query). A thread block owns NB consecutive examples x QB consecutive
// queries, i.e. the contiguous flattened row range [n0*T, (n0+NB)*T) and column range
// [q0*SEG, (q0+QB)*SEG):
//
//   NB = T   >= BM ? 1 : BM / T      (so NB*T <= BM, or a single example when T > BM)
//   QB = SEG >= BN ? 1 : BN / SEG
//
// The block walks its row range in chunks of BM rows and its column range in chunks of BN
// columns (one chunk each when T <= BM and SEG <= BN). For each (row chunk, column chunk):
//   1. main loop: the BM x BN Gram tile(s) by a K-loop over din (and dout), tiles of the operands
//      staged in shared memory with zero padding: rows past the block's range or past N*T,
//      columns past Q*SEG, k past din/dout and MASKED tokens are loaded as 0 (a select, never a
//      multiplication, so NaN/Inf in masked tokens cannot leak in). fp32 inputs use a SIMT
//      4x4-per-thread register tile; f16/bf16 inputs use tensor cores (WMMA 16x16x16, fp32
//      accumulators). The product tile P (BM x BN, fp32) is written to shared memory.
//   2. stage 1: R[i, c] = sum of P[r, c] over the rows r of example i in this chunk
//      (score_dense multiplies by G[r, o(c)] here, skipping masked/out-of-range rows).
//   3. stage 2: each thread owns up to 16 outputs (i, j) of the block's NB x QB tile in
//      registers and adds the sum of R[i, c] over the columns c of query j in this chunk.
// After all chunks the outputs are written once (plain stores, no atomics: deterministic, and
// `out` needs no zeroing). Tiles of (examples x queries) are visited by a 2-D grid-stride loop,
// so any N and Q work (grid.x up to 2^31-1, grid.y <= 65535).
//
// The [N, T, Q, S] / [N, T, Q, dout] intermediates never exist beyond one BM x BN tile.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fastinf CUDA kernels need sm_80 or newer (bf16 tensor cores); set FASTINF_CUDA_ARCHS"
#endif

namespace fastinf {
namespace cuda {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename E>
__device__ __forceinline__ E zero_of();
template <>
__device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }

inline std::string launch_error(const char* where) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return std::string();
  return std::string(where) + ": " + cudaGetErrorString(err);
}

// Calls f.template operator()<T>() with T the element type named by `dtype`.
template <typename F>
std::string dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
    default: return "unsupported dtype code " + std::to_string(dtype);
  }
}

namespace gram {

constexpr int BM = 64;                           // token rows per tile
constexpr int BN = 64;                           // token (or output-row) columns per tile
constexpr int THREADS = 256;                     // 8 warps
constexpr int OUT_PER_THREAD = BM * BN / THREADS;  // NB*QB <= BM*BN outputs per block: 16
constexpr int LDP = BN + 4;  // P row stride (floats): multiple of 4 and 16*LDP*4 % 32 == 0 (WMMA)

// SIMT (fp32) main loop: K step and the 4x4 register tile of each of the 16x16 threads.
constexpr int BK_SIMT = 16;
constexpr int LDS_SIMT = BM + 4;  // k-major staging rows: [BK_SIMT][BM + 4]
static_assert(BM == BN, "the SIMT staging layout assumes square tiles");

// WMMA (f16/bf16) main loop: K step; staging row stride LDK elements = 80 bytes, a multiple of
// 16 bytes (ldm % 8 == 0) with every 16-row / 16-column fragment origin 32-byte aligned.
constexpr int BK_MMA = 32;
constexpr int LDK = BK_MMA + 8;

enum Mode : int { kFactored = 0, kDense = 1 };

struct Args {
  const void* X1;          // [NR, K1] row operand of the first product (A)
  const void* Y1;          // [NC, K1] column operand of the first product (V, or M flattened)
  const void* X2;          // [NR, K2] G: row operand of the second product (factored), or the
                           //          [NR, SEG] epilogue factor (dense)
  const void* Y2;          // [NC, K2] U: column operand of the second product (factored only)
  const uint8_t* row_mask;  // [NR] (a_mask flattened) or null
  const uint8_t* col_mask;  // [NC] (v_mask flattened) or null; always null for dense
  float* out;              // [N, Q]
  int64_t N, Q;            // examples, queries
  int64_t T, SEG;          // rows per example; columns per query (S, or dout for dense)
  int64_t K1, K2;          // din; dout (factored) / unused (dense)
  int64_t NB, QB;          // examples / queries per block tile
  int64_t n_tiles, q_tiles;
};

// Stages rows [row0, row0 + BM) x k [k0, k0 + BK_SIMT) of X ([*, K] row-major) as fp32 into
// sh[k][r] (k-major). Rows r >= nvalid, masked rows and k >= K are written as 0.
template <typename E>
__device__ __forceinline__ void stage_kmajor(float (*sh)[LDS_SIMT], const E* __restrict__ X,
                                             int64_t row0, int nvalid,
                                             const uint8_t* __restrict__ mask, int64_t K,
                                             int64_t k0) {
  for (int idx = threadIdx.x; idx < BM * BK_SIMT; idx += THREADS) {
    const int r = idx / BK_SIMT, k = idx % BK_SIMT;
    const int64_t kk = k0 + k;
    float v = 0.f;
    if (r < nvalid && kk < K && (mask == nullptr || mask[row0 + r] != 0))
      v = to_f32(X[(row0 + r) * K + kk]);
    sh[k][r] = v;
  }
}

// Stages rows [row0, row0 + BM) x k [k0, k0 + BK_MMA) of X into sh[r][k] (row-major, element
// type kept). Same zero padding as stage_kmajor.
template <typename E>
__device__ __forceinline__ void stage_rowmajor(E (*sh)[LDK], const E* __restrict__ X,
                                               int64_t row0, int nvalid,
                                               const uint8_t* __restrict__ mask, int64_t K,
                                               int64_t k0) {
  for (int idx = threadIdx.x; idx < BM * BK_MMA; idx += THREADS) {
    const int r = idx / BK_MMA, k = idx % BK_MMA;
    const int64_t kk = k0 + k;
    E v = zero_of<E>();
    if (r < nvalid && kk < K && (mask == nullptr || mask[row0 + r] != 0))
      v = X[(row0 + r) * K + kk];
    sh[r][k] = v;
  }
}

// Where a chunk lies: rows [row0, row0 + rows_valid) and columns [col0, col0 + cols_valid) of
// the flattened operands hold data; the rest of the BM x BN tile is zero padding.
struct Chunk {
  int64_t row0, col0;
  int rows_valid, cols_valid;
};

// ---- SIMT main loop (fp32): thread (ty, tx) of a 16 x 16 grid owns rows ty + 16*i and
// columns tx + 16*j (i, j < 4) of the tile, so that shared reads are broadcasts (Xs) or
// consecutive (Ys).
template <typename E>
__device__ __forceinline__ void simt_gemm(float (&acc)[4][4], float (*Xs)[LDS_SIMT],
                                          float (*Ys)[LDS_SIMT], const E* X, const E* Y,
                                          int64_t K, const Chunk& ch, const uint8_t* row_mask,
                                          const uint8_t* col_mask) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t k0 = 0; k0 < K; k0 += BK_SIMT) {
    stage_kmajor(Xs, X, ch.row0, ch.rows_valid, row_mask, K, k0);
    stage_kmajor(Ys, Y, ch.col0, ch.cols_valid, col_mask, K, k0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK_SIMT; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Xs[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Ys[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // before the next stage overwrites Xs / Ys
  }
}

// Writes the chunk's product tile (before any G epilogue) into P; ends with __syncthreads.
template <typename E, int kMode>
__device__ void simt_tile(float (*P)[LDP], const Args& p, const Chunk& ch) {
  __shared__ float Xs[BK_SIMT][LDS_SIMT];
  __shared__ float Ys[BK_SIMT][LDS_SIMT];
  float a1[4][4], a2[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) a1[i][j] = a2[i][j] = 0.f;
  simt_gemm<E>(a1, Xs, Ys, static_cast<const E*>(p.X1), static_cast<const E*>(p.Y1), p.K1, ch,
               p.row_mask, p.col_mask);
  if constexpr (kMode == kFactored)
    simt_gemm<E>(a2, Xs, Ys, static_cast<const E*>(p.X2), static_cast<const E*>(p.Y2), p.K2,
                 ch, p.row_mask, p.col_mask);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      P[ty + 16 * i][tx + 16 * j] = kMode == kFactored ? a1[i][j] * a2[i][j] : a1[i][j];
  __syncthreads();
}

// ---- WMMA main loop (f16/bf16): warp w owns the 16-row strip wr = w / 2 and the two 16-column
// fragments wc + {0, 16}, wc = 32 * (w % 2), of the 64 x 64 tile.
using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

template <typename E>
__device__ __forceinline__ void mma_gemm(FragAcc (&acc)[2], E (*Xs)[LDK], E (*Ys)[LDK],
                                         const E* X, const E* Y, int64_t K, const Chunk& ch,
                                         const uint8_t* row_mask, const uint8_t* col_mask) {
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x / 32;
  const int wr = 16 * (warp / 2), wc = 32 * (warp % 2);
  for (int64_t k0 = 0; k0 < K; k0 += BK_MMA) {
    stage_rowmajor(Xs, X, ch.row0, ch.rows_valid, row_mask, K, k0);
    stage_rowmajor(Ys, Y, ch.col0, ch.cols_valid, col_mask, K, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK_MMA; kk += 16) {
      // a = X tile rows (row-major [m][k]); b[k][n] = Y[n][k], i.e. Ys read as column-major.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
      wmma::load_matrix_sync(a, &Xs[wr][kk], LDK);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b;
        wmma::load_matrix_sync(b, &Ys[wc + 16 * j][kk], LDK);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
    __syncthreads();  // before the next stage overwrites Xs / Ys
  }
}

template <typename E, int kMode>
__device__ void mma_tile(float (*P)[LDP], const Args& p, const Chunk& ch) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(128) E Xs[BM][LDK];
  __shared__ __align__(128) E Ys[BN][LDK];
  FragAcc a1[2], a2[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    wmma::fill_fragment(a1[j], 0.f);
    wmma::fill_fragment(a2[j], 0.f);
  }
  mma_gemm<E>(a1, Xs, Ys, static_cast<const E*>(p.X1), static_cast<const E*>(p.Y1), p.K1, ch,
              p.row_mask, p.col_mask);
  if constexpr (kMode == kFactored) {
    mma_gemm<E>(a2, Xs, Ys, static_cast<const E*>(p.X2), static_cast<const E*>(p.Y2), p.K2, ch,
                p.row_mask, p.col_mask);
    // a1 and a2 are fragments of one type covering the same 16x16 tile, so element e of both
    // maps to the same (row, col): the elementwise product is the Hadamard product of the tiles.
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < a1[j].num_elements; ++e) a1[j].x[e] *= a2[j].x[e];
  }
  const int warp = threadIdx.x / 32;
  const int wr = 16 * (warp / 2), wc = 32 * (warp % 2);
#pragma unroll
  for (int j = 0; j < 2; ++j)
    wmma::store_matrix_sync(&P[wr][wc + 16 * j], a1[j], LDP, wmma::mem_row_major);
  __syncthreads();
}

template <typename E, int kMode>
__global__ void __launch_bounds__(THREADS, 2) gram_tiles(const Args p) {
  __shared__ __align__(128) float P[BM][LDP];  // product tile of the current chunk
  __shared__ float R[BM][BN];                   // P summed over the rows of each example

  const int tid = threadIdx.x;
  const int64_t NR = p.N * p.T;      // flattened rows
  const int64_t NC = p.Q * p.SEG;    // flattened columns
  const int64_t LR = p.NB * p.T;     // rows of a block's row range
  const int64_t LC = p.QB * p.SEG;   // columns of a block's column range
  const int64_t n_out = p.NB * p.QB;  // <= BM * BN = THREADS * OUT_PER_THREAD

  for (int64_t nt = blockIdx.x; nt < p.n_tiles; nt += gridDim.x) {
    for (int64_t qt = blockIdx.y; qt < p.q_tiles; qt += gridDim.y) {
      // nt, qt are uniform over the block, so every __syncthreads below is reached by all.
      const int64_t n0 = nt * p.NB, q0 = qt * p.QB;
      float acc[OUT_PER_THREAD];
#pragma unroll
      for (int k = 0; k < OUT_PER_THREAD; ++k) acc[k] = 0.f;

      for (int64_t rb = 0; rb < LR; rb += BM) {
        for (int64_t cb = 0; cb < LC; cb += BN) {
          Chunk ch;
          ch.row0 = n0 * p.T + rb;
          ch.col0 = q0 * p.SEG + cb;
          const int64_t rows_in_chunk = LR - rb < BM ? LR - rb : BM;  // of the block's range
          const int64_t cols_in_chunk = LC - cb < BN ? LC - cb : BN;
          int64_t rv = NR - ch.row0 < rows_in_chunk ? NR - ch.row0 : rows_in_chunk;
          int64_t cv = NC - ch.col0 < cols_in_chunk ? NC - ch.col0 : cols_in_chunk;
          ch.rows_valid = static_cast<int>(rv > 0 ? rv : 0);
          ch.cols_valid = static_cast<int>(cv > 0 ? cv : 0);

          // 1. P = product tile (zero outside the valid rows/columns and on masked tokens).
          if constexpr (std::is_same<E, float>::value)
            simt_tile<E, kMode>(P, p, ch);
          else
            mma_tile<E, kMode>(P, p, ch);

          // Examples i (block-local) and queries j with rows/columns in this chunk.
          const int64_t i_lo = rb / p.T;
          const int64_t i_hi_raw = (rb + rows_in_chunk - 1) / p.T + 1;
          const int64_t i_hi = i_hi_raw < p.NB ? i_hi_raw : p.NB;
          const int64_t j_lo = cb / p.SEG;
          const int64_t j_hi_raw = (cb + cols_in_chunk - 1) / p.SEG + 1;
          const int64_t j_hi = j_hi_raw < p.QB ? j_hi_raw : p.QB;
          const int ni = static_cast<int>(i_hi - i_lo);  // <= NB <= BM

          // 2. R[il][c] = sum over the rows of example i_lo + il (dense: times G[r, o(c)]).
          for (int idx = tid; idx < ni * BN; idx += THREADS) {
            const int il = idx / BN, c = idx % BN;
            const int64_t i = i_lo + il;
            int64_t r_begin = i * p.T - rb, r_end = (i + 1) * p.T - rb;
            if (r_begin < 0) r_begin = 0;
            if (r_end > rows_in_chunk) r_end = rows_in_chunk;
            float s = 0.f;
            if constexpr (kMode == kFactored) {
              for (int64_t r = r_begin; r < r_end; ++r) s += P[r][c];
            } else if (c < ch.cols_valid) {
              const E* Gm = static_cast<const E*>(p.X2);
              const int64_t o = (ch.col0 + c) % p.SEG;
              if (r_end > ch.rows_valid) r_end = ch.rows_valid;
              for (int64_t r = r_begin; r < r_end; ++r) {
                const int64_t g = ch.row0 + r;
                if (p.row_mask == nullptr || p.row_mask[g] != 0)
                  s += P[r][c] * to_f32(Gm[g * p.SEG + o]);
              }
            }
            R[il][c] = s;
          }
          __syncthreads();

          // 3. Each thread adds, to the outputs it owns, the columns of their query.
#pragma unroll
          for (int k = 0; k < OUT_PER_THREAD; ++k) {
            const int64_t o = tid + static_cast<int64_t>(k) * THREADS;
            if (o < n_out) {
              const int64_t i = o / p.QB, j = o % p.QB;
              if (i >= i_lo && i < i_hi && j >= j_lo && j < j_hi) {
                int64_t c_begin = j * p.SEG - cb, c_end = (j + 1) * p.SEG - cb;
                if (c_begin < 0) c_begin = 0;
                if (c_end > cols_in_chunk) c_end = cols_in_chunk;
                float s = 0.f;
                for (int64_t c = c_begin; c < c_end; ++c) s += R[i - i_lo][c];
                acc[k] += s;
              }
            }
          }
          __syncthreads();  // P and R are rewritten by the next chunk
        }
      }

#pragma unroll
      for (int k = 0; k < OUT_PER_THREAD; ++k) {
        const int64_t o = tid + static_cast<int64_t>(k) * THREADS;
        if (o < n_out) {
          const int64_t n = n0 + o / p.QB, q = q0 + o % p.QB;
          if (n < p.N && q < p.Q) p.out[n * p.Q + q] = acc[k];
        }
      }
    }
  }
}

// Fills the tiling fields of `p` (N, Q, T, SEG set, N, Q, T, SEG >= 1) and launches.
template <typename E, int kMode>
std::string launch(Args p, cudaStream_t stream, const char* where) {
  p.NB = p.T >= BM ? 1 : BM / p.T;
  p.QB = p.SEG >= BN ? 1 : BN / p.SEG;
  p.n_tiles = (p.N + p.NB - 1) / p.NB;
  p.q_tiles = (p.Q + p.QB - 1) / p.QB;
  const dim3 grid(static_cast<unsigned>(p.n_tiles < INT_MAX ? p.n_tiles : INT_MAX),
                  static_cast<unsigned>(p.q_tiles < 65535 ? p.q_tiles : 65535));
  gram_tiles<E, kMode><<<grid, THREADS, 0, stream>>>(p);
  return launch_error(where);
}

// out[N, Q] = 0 on `stream` (empty token or output ranges).
inline std::string zero_out(float* out, int64_t N, int64_t Q, cudaStream_t stream,
                            const char* where) {
  const cudaError_t err = cudaMemsetAsync(
      out, 0, static_cast<size_t>(N) * static_cast<size_t>(Q) * sizeof(float), stream);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: the message is returned instead
    return std::string(where) + ": " + cudaGetErrorString(err);
  }
  return std::string();
}

}  // namespace gram
}  // namespace cuda
}  // namespace fastinf
