// ekfac_lambda on CUDA, on rotated factors At = A Q_A [N,T,din], Gt = G Q_S [N,T,dout]:
//   out[o,i] = sum_n (sum_t Gt[n,t,o] * At[n,t,i])^2
// One thread per output element (o, i); threads of a block share the column tile so loads of
// At rows coalesce. fp32 accumulation; deterministic (fixed summation order).
#include "score_engine.cuh"

namespace fastinf {
namespace cuda {
namespace {

template <typename E>
__global__ void ekfac_lambda_kernel(const E* __restrict__ At, const E* __restrict__ Gt,
                                    const uint8_t* __restrict__ a_mask, float* __restrict__ out,
                                    int64_t N, int64_t T, int64_t din, int64_t dout) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (i >= din || o >= dout) return;
  float acc = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    float r = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = n * T + t;
      if (a_mask && !a_mask[row]) continue;
      r += to_f32(Gt[row * dout + o]) * to_f32(At[row * din + i]);
    }
    acc += r * r;
  }
  out[o * din + i] = acc;
}

}  // namespace

std::string ekfac_lambda(const void* At, const void* Gt, const uint8_t* a_mask, float* out,
                         int64_t N, int64_t T, int64_t din, int64_t dout, int dtype,
                         uintptr_t stream) {
  if (din == 0 || dout == 0) return std::string();
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 block(32, 8);
  const int64_t gx = (din + block.x - 1) / block.x;
  const int64_t gy = (dout + block.y - 1) / block.y;
  if (gy > 65535) return "ekfac_lambda: dout > 524280 not supported by this kernel";
  if (gx > 2147483647LL) return "ekfac_lambda: din too large for this kernel";
  return dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    ekfac_lambda_kernel<E><<<grid, block, 0, st>>>(static_cast<const E*>(At),
                                                   static_cast<const E*>(Gt), a_mask, out, N, T,
                                                   din, dout);
    return launch_error("ekfac_lambda launch");
  });
}

}  // namespace cuda
}  // namespace fastinf
