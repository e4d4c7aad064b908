// kron_project on CUDA: Y[n] = sum_t (P_out^T g_t)(P_in^T a_t)^T.
// One block per (example, 16 x 16 tile of Y[n]); 256 threads. Per token the block projects g_t
// onto its 16 columns of P_out and a_t onto its 16 columns of P_in (16 threads share each dot
// product, reduced through shared memory), then every thread adds one product to its output.
#include "score_engine.cuh"

namespace fastinf {
namespace cuda {
namespace {

constexpr int KT = 16;  // tile edge of Y[n]

template <typename T>
__global__ void kron_project_tiles(const T* __restrict__ A, const T* __restrict__ G,
                                   const T* __restrict__ P_in, const T* __restrict__ P_out,
                                   const uint8_t* __restrict__ a_mask, float* __restrict__ out,
                                   int64_t T_, int64_t din, int64_t dout, int64_t k_in,
                                   int64_t k_out, int64_t tiles_in) {
  __shared__ float part_g[KT][KT + 1];  // [column of the tile][partial]
  __shared__ float part_a[KT][KT + 1];
  __shared__ float gg[KT], aa[KT];
  const int64_t n = blockIdx.y;
  const int64_t o0 = (blockIdx.x / tiles_in) * KT;
  const int64_t i0 = (blockIdx.x % tiles_in) * KT;
  const int tid = threadIdx.x;
  const int col = tid / KT, lane = tid % KT;  // column of the tile, partial-sum lane
  float acc = 0.f;
  for (int64_t t = 0; t < T_; ++t) {
    if (a_mask && !a_mask[n * T_ + t]) continue;  // uniform across the block
    const T* g = G + (n * T_ + t) * dout;
    const T* a = A + (n * T_ + t) * din;
    float sg = 0.f, sa = 0.f;
    const int64_t o = o0 + col, i = i0 + col;
    if (o < k_out)
      for (int64_t e = lane; e < dout; e += KT) sg += to_f32(g[e]) * to_f32(P_out[e * k_out + o]);
    if (i < k_in)
      for (int64_t d = lane; d < din; d += KT) sa += to_f32(a[d]) * to_f32(P_in[d * k_in + i]);
    part_g[col][lane] = sg;
    part_a[col][lane] = sa;
    __syncthreads();
    if (tid < KT) {
      float s = 0.f;
      for (int l = 0; l < KT; ++l) s += part_g[tid][l];
      gg[tid] = s;
    } else if (tid < 2 * KT) {
      float s = 0.f;
      for (int l = 0; l < KT; ++l) s += part_a[tid - KT][l];
      aa[tid - KT] = s;
    }
    __syncthreads();
    acc += gg[col] * aa[lane];  // output (o0 + col, i0 + lane)
    __syncthreads();
  }
  const int64_t o = o0 + col, i = i0 + lane;
  if (o < k_out && i < k_in) out[(n * k_out + o) * k_in + i] = acc;
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
  return dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    dim3 grid(static_cast<unsigned>(tiles_in * tiles_out), static_cast<unsigned>(N));
    kron_project_tiles<E><<<grid, KT * KT, 0, st>>>(
        static_cast<const E*>(A), static_cast<const E*>(G), static_cast<const E*>(P_in),
        static_cast<const E*>(P_out), a_mask, out, T, din, dout, k_in, k_out, tiles_in);
    return launch_error("kron_project launch");
  });
}

}  // namespace cuda
}  // namespace fastinf
