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
//      multiplication, so NaN/Inf in masked tokens cannot leak in). Staging is row-major with
//      cp.async 16-byte copies into two stages (the copy of the next K step overlaps the math of
//      this one; see Stage). fp32 inputs use a SIMT 4x4-per-thread register tile; f16/bf16
//      inputs use tensor cores (WMMA 16x16x16, fp32 accumulators). The product tile P (BM x BN,
//      fp32) is written to shared memory, reusing the staging buffers.
//   2. stage 1: R[i, c] = sum of P[r, c] over the rows r of example i in this chunk
//      (score_dense multiplies by G[r, o(c)] here, skipping masked/out-of-range rows).
//   3. stage 2: each thread owns up to 16 outputs (i, j) of the block's NB x QB tile and adds
//      the sum of R[i, c] over the columns c of query j in this chunk: the first chunk stores
//      the output, later chunks (T > BM or SEG > BN) add to the thread's own store.
// Plain stores, no atomics: deterministic, and `out` needs no zeroing. Tiles of (examples x
// queries) are visited by a 2-D grid-stride loop, so any N and Q work (grid.x up to 2^31-1,
// grid.y <= 65535).
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

// ---- Asynchronous global -> shared copies (cp.async, sm_80+). Every architecture built
// (FASTINF_CUDA_ARCHS, >= sm_80, enforced above) has them; the plain-copy branch only serves the
// host pass and any future pre-sm_80 build.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const size_t g = __cvta_generic_to_global(gmem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(g) : "memory");
#else
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
// acc[a][b] += g[a] * v[b]: one float4 x float4 outer product into a thread's 4 x 4 tile.
__device__ __forceinline__ void fma_outer4(float (&acc)[4][4], const float4 g, const float4 v) {
  const float gs[4] = {g.x, g.y, g.z, g.w};
  const float vs[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(gs[a], vs[b], acc[a][b]);
}
__device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

namespace gram {

constexpr int BM = 64;                           // token rows per tile
constexpr int BN = 64;                           // token (or output-row) columns per tile
constexpr int THREADS = 256;                     // 8 warps
constexpr int OUT_PER_THREAD = BM * BN / THREADS;  // NB*QB <= BM*BN outputs per block: 16
// P row stride (floats): a multiple of 4 with 16*LDP*4 % 32 == 0 (WMMA store), and LDP % 32 == 16
// so that the SIMT store of P (two rows ty, ty+1 of 16 columns per warp) is free of bank conflicts.
constexpr int LDP = BN + 16;
static_assert(BM == BN, "the SIMT thread layout assumes square tiles");

// Staging of the main loops, both element types: operand tiles of BM rows x BK k-values, stored
// row-major ([row][k], as in global memory) with a row stride of LD elements = 80 bytes. Each row
// is BK / VEC 16-byte chunks and BM * BK / VEC == THREADS: every thread copies exactly one chunk
// of each operand per K step, with cp.async when the chunk is whole and 16-byte aligned. Two
// stages (double buffering): the copy of step k+1 overlaps the math of step k.
//   fp32 (SIMT):    BK = 16, VEC = 4, LD = 20 floats
//   f16/bf16 (MMA): BK = 32, VEC = 8, LD = 40 halves (ldm % 8 == 0; fragment origins, at rows
//                   multiple of 16 and k in {0, 16}, are 32-byte aligned)
// The 80-byte stride puts the 8 rows read by a quarter warp's 16-byte loads in 8 distinct
// 16-byte bank groups (5 r mod 8), so the SIMT float4 reads and the WMMA fragment loads are free
// of bank conflicts (the old k-major fp32 staging stored with a 2-way conflict).
template <typename E>
struct Stage {
  static constexpr int BK = std::is_same<E, float>::value ? 16 : 32;
  static constexpr int VEC = 16 / static_cast<int>(sizeof(E));
  static constexpr int LD = BK + VEC;
  static constexpr int TILE = BM * LD;  // elements of one operand tile
  static_assert(BM * BK / VEC == THREADS, "one 16-byte chunk per thread and operand");
  static_assert(LD * sizeof(E) == 80, "row stride of 80 bytes (bank-conflict free, aligned)");
};
// Shared bytes of the two stages x two operands; the product tile P reuses them (see gram_tiles).
constexpr int STAGE_BYTES = 2 * 2 * BM * 80;
constexpr int P_BYTES = BM * LDP * 4;
constexpr int UNION_BYTES = STAGE_BYTES > P_BYTES ? STAGE_BYTES : P_BYTES;

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
  int64_t NB, QB;          // examples / queries per block tile (<= BM, <= BN)
  int64_t n_tiles, q_tiles;
};

// Stages rows [row0, row0 + BM) x k [k0, k0 + BK) of X ([*, K] row-major) into sh[r * LD + k]:
// this thread's 16-byte chunk. Rows r >= nvalid, masked rows and k >= K are written as 0 (a
// select: masked rows are never read, so NaN/Inf in them cannot leak). `vec`: K % VEC == 0 and
// X 16-byte aligned, so a chunk is either wholly inside k < K (one cp.async) or wholly outside.
template <typename E>
__device__ __forceinline__ void stage_tile(E* __restrict__ sh, const E* __restrict__ X,
                                           int64_t row0, int nvalid,
                                           const uint8_t* __restrict__ mask, int64_t K,
                                           int64_t k0, bool vec) {
  using S = Stage<E>;
  constexpr int CPR = S::BK / S::VEC;  // chunks per row
  const int r = threadIdx.x / CPR, kc = (threadIdx.x % CPR) * S::VEC;
  E* dst = sh + r * S::LD + kc;
  const int64_t kk = k0 + kc;
  const bool row_ok = r < nvalid && (mask == nullptr || mask[row0 + r] != 0);
  const E* src = X + (row0 + r) * K + kk;  // only dereferenced when row_ok and kk + e < K
  if (row_ok && vec && kk < K) {
    cp_async16(dst, src);
  } else if (!row_ok || kk >= K) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  } else {  // tail or unaligned operand: element by element
#pragma unroll
    for (int e = 0; e < S::VEC; ++e) {
      E v = zero_of<E>();
      if (kk + e < K) v = src[e];
      dst[e] = v;
    }
  }
}

// Where a chunk lies: rows [row0, row0 + rows_valid) and columns [col0, col0 + cols_valid) of
// the flattened operands hold data; the rest of the BM x BN tile is zero padding.
struct Chunk {
  int64_t row0, col0;
  int rows_valid, cols_valid;
};

// The K loop shared by both main loops: `buf` holds 2 stages x (X tile, Y tile); math(Xs, Ys)
// consumes one staged step. Pipeline: copy step 0; then for each step, issue the copy of the next
// step into the other stage, wait for the current one (cp.async.wait_group 1), barrier, math,
// barrier (the stage is overwritten two steps later). Ends with a barrier and no copy in flight,
// so the caller may reuse `buf` (as P) once every thread has returned.
template <typename E, typename Math>
__device__ __forceinline__ void k_loop(E* __restrict__ buf, const E* X, const E* Y, int64_t K,
                                       const Chunk& ch, const uint8_t* row_mask,
                                       const uint8_t* col_mask, Math&& math) {
  using S = Stage<E>;
  const bool vec = K % S::VEC == 0 && aligned16(X) && aligned16(Y);
  const int64_t steps = (K + S::BK - 1) / S::BK;
  if (steps <= 0) return;
  stage_tile(buf, X, ch.row0, ch.rows_valid, row_mask, K, 0, vec);
  stage_tile(buf + S::TILE, Y, ch.col0, ch.cols_valid, col_mask, K, 0, vec);
  cp_async_commit();
  for (int64_t s = 0; s < steps; ++s) {
    E* cur = buf + (s & 1) * 2 * S::TILE;
    if (s + 1 < steps) {
      E* nxt = buf + ((s + 1) & 1) * 2 * S::TILE;
      const int64_t k0 = (s + 1) * S::BK;
      stage_tile(nxt, X, ch.row0, ch.rows_valid, row_mask, K, k0, vec);
      stage_tile(nxt + S::TILE, Y, ch.col0, ch.cols_valid, col_mask, K, k0, vec);
    }
    cp_async_commit();  // possibly empty: keeps "all but the newest group" = step s
    cp_async_wait<1>();
    __syncthreads();  // step s visible to every thread (cp.async and plain stores)
    math(static_cast<const E*>(cur), static_cast<const E*>(cur + S::TILE));
    __syncthreads();  // before stage (s & 1) is refilled by step s + 2
  }
}

// ---- SIMT main loop (fp32): thread (ty, tx) of a 16 x 16 grid owns rows ty + 16*i and
// columns tx + 16*j (i, j < 4) of the tile. Per 4 k-values it reads one float4 of each of its 4
// X rows (a quarter warp shares one row: broadcast) and 4 Y rows (8 distinct rows per quarter
// warp, conflict free with the 80-byte stride).
__device__ __forceinline__ void simt_gemm(float (&acc)[4][4], float* buf, const void* X,
                                          const void* Y, int64_t K, const Chunk& ch,
                                          const uint8_t* row_mask, const uint8_t* col_mask) {
  using S = Stage<float>;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  k_loop(buf, static_cast<const float*>(X), static_cast<const float*>(Y), K, ch, row_mask,
         col_mask, [&](const float* Xs, const float* Ys) {
#pragma unroll
           for (int k = 0; k < S::BK; k += 4) {
             float4 a[4];
#pragma unroll
             for (int i = 0; i < 4; ++i)
               a[i] = *reinterpret_cast<const float4*>(Xs + (ty + 16 * i) * S::LD + k);
#pragma unroll
             for (int j = 0; j < 4; ++j) {  // one Y float4 live at a time (register budget)
               const float4 b = *reinterpret_cast<const float4*>(Ys + (tx + 16 * j) * S::LD + k);
#pragma unroll
               for (int i = 0; i < 4; ++i) {
                 acc[i][j] = fmaf(a[i].x, b.x, acc[i][j]);
                 acc[i][j] = fmaf(a[i].y, b.y, acc[i][j]);
                 acc[i][j] = fmaf(a[i].z, b.z, acc[i][j]);
                 acc[i][j] = fmaf(a[i].w, b.w, acc[i][j]);
               }
             }
           }
         });
}

// Writes the chunk's product tile (before any G epilogue) into P; ends with __syncthreads.
template <int kMode>
__device__ void simt_tile(float (*P)[LDP], float* buf, const Args& p, const Chunk& ch) {
  float a1[4][4], a2[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) a1[i][j] = a2[i][j] = 0.f;
  simt_gemm(a1, buf, p.X1, p.Y1, p.K1, ch, p.row_mask, p.col_mask);
  if constexpr (kMode == kFactored)
    simt_gemm(a2, buf, p.X2, p.Y2, p.K2, ch, p.row_mask, p.col_mask);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  // P aliases buf: every thread is past k_loop's last barrier, and no copy is in flight.
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
__device__ __forceinline__ void mma_gemm(FragAcc (&acc)[2], E* buf, const void* X,
                                         const void* Y, int64_t K, const Chunk& ch,
                                         const uint8_t* row_mask, const uint8_t* col_mask) {
  namespace wmma = nvcuda::wmma;
  using S = Stage<E>;
  const int warp = threadIdx.x / 32;
  const int wr = 16 * (warp / 2), wc = 32 * (warp % 2);
  k_loop(buf, static_cast<const E*>(X), static_cast<const E*>(Y), K, ch, row_mask, col_mask,
         [&](const E* Xs, const E* Ys) {
#pragma unroll
           for (int kk = 0; kk < S::BK; kk += 16) {
             // a = X tile rows (row-major [m][k]); b[k][n] = Y[n][k]: Ys read as column-major.
             wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
             wmma::load_matrix_sync(a, Xs + wr * S::LD + kk, S::LD);
#pragma unroll
             for (int j = 0; j < 2; ++j) {
               wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b;
               wmma::load_matrix_sync(b, Ys + (wc + 16 * j) * S::LD + kk, S::LD);
               wmma::mma_sync(acc[j], a, b, acc[j]);
             }
           }
         });
}

template <typename E, int kMode>
__device__ void mma_tile(float (*P)[LDP], E* buf, const Args& p, const Chunk& ch) {
  namespace wmma = nvcuda::wmma;
  FragAcc a1[2], a2[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    wmma::fill_fragment(a1[j], 0.f);
    wmma::fill_fragment(a2[j], 0.f);
  }
  mma_gemm<E>(a1, buf, p.X1, p.Y1, p.K1, ch, p.row_mask, p.col_mask);
  if constexpr (kMode == kFactored) {
    mma_gemm<E>(a2, buf, p.X2, p.Y2, p.K2, ch, p.row_mask, p.col_mask);
    // a1 and a2 are fragments of one type covering the same 16x16 tile, so element e of both
    // maps to the same (row, col): the elementwise product is the Hadamard product of the tiles.
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < a1[j].num_elements; ++e) a1[j].x[e] *= a2[j].x[e];
  }
  const int warp = threadIdx.x / 32;
  const int wr = 16 * (warp / 2), wc = 32 * (warp % 2);
  // P aliases buf: every thread is past k_loop's last barrier, and no copy is in flight.
#pragma unroll
  for (int j = 0; j < 2; ++j)
    wmma::store_matrix_sync(&P[wr][wc + 16 * j], a1[j], LDP, wmma::mem_row_major);
  __syncthreads();
}

template <typename E, int kMode>
__global__ void __launch_bounds__(THREADS, 2) gram_tiles(const Args p) {
  // The staging buffers of the main loop and the product tile P of a chunk share one block of
  // shared memory: P is written after the main loop's last barrier and read (stage 1) before the
  // barrier that ends the chunk, after which the next chunk's main loop refills the stages.
  __shared__ __align__(128) unsigned char smem[UNION_BYTES];
  __shared__ float R[BM][BN];  // P summed over the rows of each example
  float(*P)[LDP] = reinterpret_cast<float(*)[LDP]>(smem);
  E* buf = reinterpret_cast<E*>(smem);

  const int tid = threadIdx.x;
  const int64_t NR = p.N * p.T;      // flattened rows
  const int64_t NC = p.Q * p.SEG;    // flattened columns
  const int64_t LR = p.NB * p.T;     // rows of a block's row range
  const int64_t LC = p.QB * p.SEG;   // columns of a block's column range
  const int QB = static_cast<int>(p.QB);  // <= BN
  const int n_out = static_cast<int>(p.NB) * QB;  // <= BM * BN = THREADS * OUT_PER_THREAD

  for (int64_t nt = blockIdx.x; nt < p.n_tiles; nt += gridDim.x) {
    for (int64_t qt = blockIdx.y; qt < p.q_tiles; qt += gridDim.y) {
      // nt, qt are uniform over the block, so every __syncthreads below is reached by all.
      const int64_t n0 = nt * p.NB, q0 = qt * p.QB;

      for (int64_t rb = 0; rb < LR; rb += BM) {
        for (int64_t cb = 0; cb < LC; cb += BN) {
          Chunk ch;
          ch.row0 = n0 * p.T + rb;
          ch.col0 = q0 * p.SEG + cb;
          const int rows_in_chunk = static_cast<int>(LR - rb < BM ? LR - rb : BM);  // of the
          const int cols_in_chunk = static_cast<int>(LC - cb < BN ? LC - cb : BN);  // block's
          int64_t rv = NR - ch.row0 < rows_in_chunk ? NR - ch.row0 : rows_in_chunk;
          int64_t cv = NC - ch.col0 < cols_in_chunk ? NC - ch.col0 : cols_in_chunk;
          ch.rows_valid = static_cast<int>(rv > 0 ? rv : 0);
          ch.cols_valid = static_cast<int>(cv > 0 ? cv : 0);

          // 1. P = product tile (zero outside the valid rows/columns and on masked tokens).
          if constexpr (std::is_same<E, float>::value)
            simt_tile<kMode>(P, buf, p, ch);
          else
            mma_tile<E, kMode>(P, buf, p, ch);

          // Examples i (block-local) with rows in this chunk: i_lo <= i < i_hi <= NB (int).
          const int i_lo = static_cast<int>(rb / p.T);
          const int64_t i_hi_raw = (rb + rows_in_chunk - 1) / p.T + 1;
          const int i_hi = static_cast<int>(i_hi_raw < p.NB ? i_hi_raw : p.NB);
          const int ni = i_hi - i_lo;  // <= NB <= BM

          // 2. R[il][c] = sum over the rows of example i_lo + il (dense: times G[r, o(c)]).
          for (int idx = tid; idx < ni * BN; idx += THREADS) {
            const int il = idx / BN, c = idx % BN;
            const int64_t i = i_lo + il;
            int64_t rbeg = i * p.T - rb, rend = (i + 1) * p.T - rb;
            const int r_begin = static_cast<int>(rbeg < 0 ? 0 : rbeg);
            int r_end = static_cast<int>(rend > rows_in_chunk ? rows_in_chunk : rend);
            float s = 0.f;
            if constexpr (kMode == kFactored) {
              for (int r = r_begin; r < r_end; ++r) s += P[r][c];
            } else if (c < ch.cols_valid) {
              const E* Gm = static_cast<const E*>(p.X2);
              // o(c) = (col0 + c) % SEG with col0 = q0*SEG + cb: for QB == 1, cb + c < LC = SEG;
              // for QB > 1 (SEG < BN) the block's columns are one chunk (cb == 0).
              const int64_t o = QB == 1 ? cb + c : c % static_cast<int>(p.SEG);
              if (r_end > ch.rows_valid) r_end = ch.rows_valid;
              for (int r = r_begin; r < r_end; ++r) {
                const int64_t g = ch.row0 + r;
                if (p.row_mask == nullptr || p.row_mask[g] != 0)
                  s += P[r][c] * to_f32(Gm[g * p.SEG + o]);
              }
            }
            R[il][c] = s;
          }
          __syncthreads();

          // 3. Each thread adds, to the outputs it owns, the columns of their query. Every
          // chunk spans all NB examples and QB queries of the block (NB > 1 means one row chunk,
          // NB == 1 puts example 0 in every row chunk; columns alike), so the first chunk stores
          // every output and later chunks add to it: the thread re-reads only its own stores
          // (program order, no race), the order of the sums is fixed (deterministic), and no
          // accumulator stays live in registers across the main loop.
          const bool first = rb == 0 && cb == 0;
#pragma unroll 4
          for (int k = 0; k < OUT_PER_THREAD; ++k) {
            const int o = tid + k * THREADS;
            if (o < n_out) {
              const int i = o / QB, j = o % QB;
              const int64_t n = n0 + i, q = q0 + j;
              if (n < p.N && q < p.Q) {
                const int64_t cbeg = j * p.SEG - cb, cend = (j + 1) * p.SEG - cb;
                const int c_begin = static_cast<int>(cbeg < 0 ? 0 : cbeg);
                const int c_end = static_cast<int>(cend > cols_in_chunk ? cols_in_chunk : cend);
                float s = 0.f;
                for (int c = c_begin; c < c_end; ++c) s += R[i - i_lo][c];
                float* dst = p.out + n * p.Q + q;
                *dst = first ? s : *dst + s;
              }
            }
          }
          __syncthreads();  // P (the stages) and R are rewritten by the next chunk
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
