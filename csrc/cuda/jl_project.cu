// jl_project on CUDA: Y = X Phi^T with Phi tiles generated in shared memory from the counter-based
// hash of common/jl_hash.h (the same definition as the CPU kernel). Each block computes a 32 x 32 tile of
// Y (32 rows of X x 32 rows of Phi) with 32 x 8 threads (4 outputs each), walking p in steps of 32.
#include <cmath>

#include "score_engine.cuh"
#include "common/jl_hash.h"

namespace fastinf {
namespace cuda {
namespace {

constexpr int TILE = 32;
constexpr int TY = 8;

template <typename T>
__global__ void jl_project_tiles(const T* __restrict__ X, float* __restrict__ out, int64_t N,
                                 int64_t p, int64_t k, uint32_t key, int kind, float scale) {
  __shared__ float xs[TILE][TILE + 1];  // [n][i]
  __shared__ float ps[TILE][TILE + 1];  // [j][i]
  __shared__ uint32_t rows[TILE];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * TILE + tx;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * TILE;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * TILE;
  if (tid < TILE) {
    const uint32_t j = static_cast<uint32_t>(j0 + tid);
    rows[tid] = jl::row_key(key, j);
  }
  float acc[TILE / TY] = {0.f, 0.f, 0.f, 0.f};
  __syncthreads();
  for (int64_t i0 = 0; i0 < p; i0 += TILE) {
    for (int idx = tid; idx < TILE * TILE; idx += TILE * TY) {
      const int r = idx / TILE, cc = idx % TILE;
      const int64_t i = i0 + cc;
      const int64_t n = n0 + r;
      xs[r][cc] = (n < N && i < p) ? to_f32(X[n * p + i]) : 0.f;
      const int64_t j = j0 + r;
      ps[r][cc] = (j < k && i < p)
                      ? jl::entry(jl::hash(rows[r], static_cast<uint32_t>(i)), kind)
                      : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int cc = 0; cc < TILE; ++cc) {
      const float pv = ps[tx][cc];
#pragma unroll
      for (int r = 0; r < TILE / TY; ++r) acc[r] += xs[ty + TY * r][cc] * pv;
    }
    __syncthreads();
  }
  const int64_t j = j0 + tx;
  if (j < k) {
#pragma unroll
    for (int r = 0; r < TILE / TY; ++r) {
      const int64_t n = n0 + ty + TY * r;
      if (n < N) out[n * k + j] = acc[r] * scale;
    }
  }
}

}  // namespace

std::string jl_project(const void* X, float* out, int64_t N, int64_t p, int64_t k, uint32_t key,
                       int kind, int dtype, uintptr_t stream) {
  if (N <= 0 || p <= 0 || k <= 0) return std::string();
  if (kind != 0 && kind != 1) return "jl_project: kind must be 0 (rademacher) or 1 (normal)";
  const int64_t gx = (N + TILE - 1) / TILE, gy = (k + TILE - 1) / TILE;
  if (gx > 2147483647LL || gy > 65535) return "jl_project: N or k too large for the grid";
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const float scale = 1.f / std::sqrt(static_cast<float>(k));
  return dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    dim3 block(TILE, TY);
    jl_project_tiles<E><<<grid, block, 0, st>>>(static_cast<const E*>(X), out, N, p, k, key, kind,
                                                scale);
    return launch_error("jl_project launch");
  });
}

}  // namespace cuda
}  // namespace fastinf
