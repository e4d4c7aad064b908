// score_dense on CUDA: S[n,q] = sum_t G[n,t]^T M[q] A[n,t].
// One block per (n, q) pair; threads split the output rows o; fp32 accumulation.
#include "common.cuh"

namespace fastinf {
namespace cuda {
namespace {

template <typename T>
__global__ void score_dense_pairs(const T* __restrict__ A, const T* __restrict__ G,
                                  const T* __restrict__ M, const uint8_t* __restrict__ a_mask,
                                  float* __restrict__ out, int64_t T_, int64_t Q, int64_t din,
                                  int64_t dout) {
  const int64_t n = blockIdx.y;
  const int64_t q = blockIdx.x;
  const T* Mq = M + q * dout * din;
  float acc = 0.f;
  for (int64_t t = 0; t < T_; ++t) {
    if (a_mask && !a_mask[n * T_ + t]) continue;
    const T* a = A + (n * T_ + t) * din;
    const T* g = G + (n * T_ + t) * dout;
    for (int64_t o = threadIdx.x; o < dout; o += blockDim.x) {
      const T* row = Mq + o * din;
      float y = 0.f;
      for (int64_t i = 0; i < din; ++i) y += to_f32(row[i]) * to_f32(a[i]);
      acc += to_f32(g[o]) * y;
    }
  }
  __shared__ float red[256];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[n * Q + q] = red[0];
}

}  // namespace

std::string score_dense(const void* A, const void* G, const void* M, const uint8_t* a_mask,
                        float* out, int64_t N, int64_t T, int64_t Q, int64_t din, int64_t dout,
                        int dtype, uintptr_t stream) {
  if (N == 0 || Q == 0) return std::string();
  if (N > 65535) return "score_dense: N > 65535 not supported by this kernel";
  auto st = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    dim3 grid(static_cast<unsigned>(Q), static_cast<unsigned>(N));
    score_dense_pairs<E><<<grid, 256, 0, st>>>(static_cast<const E*>(A),
                                               static_cast<const E*>(G),
                                               static_cast<const E*>(M), a_mask, out, T, Q, din,
                                               dout);
    return launch_error("score_dense launch");
  });
}

}  // namespace cuda
}  // namespace fastinf
