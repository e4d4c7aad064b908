// score_factored on CUDA: S[n,q] = sum_{t,s} (A[n,t]·V[q,s]) (G[n,t]·U[q,s]).
// One block per (n, q) pair; threads split the (t, s) token pairs; fp32 accumulation.
#include "common.cuh"

namespace fastinf {
namespace cuda {
namespace {

template <typename T>
__global__ void score_factored_pairs(const T* __restrict__ A, const T* __restrict__ G,
                                     const T* __restrict__ V, const T* __restrict__ U,
                                     const uint8_t* __restrict__ a_mask,
                                     const uint8_t* __restrict__ v_mask, float* __restrict__ out,
                                     int64_t T_, int64_t Q, int64_t S, int64_t din, int64_t dout) {
  const int64_t n = blockIdx.y;
  const int64_t q = blockIdx.x;
  float acc = 0.f;
  for (int64_t p = threadIdx.x; p < T_ * S; p += blockDim.x) {
    const int64_t t = p / S, s = p % S;
    if (a_mask && !a_mask[n * T_ + t]) continue;
    if (v_mask && !v_mask[q * S + s]) continue;
    const T* a = A + (n * T_ + t) * din;
    const T* v = V + (q * S + s) * din;
    const T* g = G + (n * T_ + t) * dout;
    const T* u = U + (q * S + s) * dout;
    float ka = 0.f, kg = 0.f;
    for (int64_t i = 0; i < din; ++i) ka += to_f32(a[i]) * to_f32(v[i]);
    for (int64_t o = 0; o < dout; ++o) kg += to_f32(g[o]) * to_f32(u[o]);
    acc += ka * kg;
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

std::string score_factored(const void* A, const void* G, const void* V, const void* U,
                           const uint8_t* a_mask, const uint8_t* v_mask, float* out, int64_t N,
                           int64_t T, int64_t Q, int64_t S, int64_t din, int64_t dout, int dtype,
                           uintptr_t stream) {
  if (N == 0 || Q == 0) return std::string();
  if (N > 65535) return "score_factored: N > 65535 not supported by this kernel";
  auto st = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    dim3 grid(static_cast<unsigned>(Q), static_cast<unsigned>(N));
    score_factored_pairs<E><<<grid, 256, 0, st>>>(
        static_cast<const E*>(A), static_cast<const E*>(G), static_cast<const E*>(V),
        static_cast<const E*>(U), a_mask, v_mask, out, T, Q, S, din, dout);
    return launch_error("score_factored launch");
  });
}

}  // namespace cuda
}  // namespace fastinf
