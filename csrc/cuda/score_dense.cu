// score_dense on CUDA: S[n,q] = sum_t G[n,t]^T M[q] A[n,t].
//
// Design (details in score_engine.cuh, "token Gram engine"): the "token" contraction as one GEMM with
// a fused epilogue. Rows are the tokens (n,t) of A flattened to [N*T, din], columns are the
// output rows (q,o) of M flattened to [Q*dout, din], so Y = A·M_flatᵀ holds (M_q a_t)[o]. A
// block owns NB examples x QB queries (NB = max(1, 64 / T), QB = max(1, 64 / dout)) and walks
// them in 64 x 64 chunks: the tile of Y by a K-loop over din (SIMT 4x4 register tiles for
// float32, WMMA tensor cores for f16/bf16, fp32 accumulation), then the epilogue multiplies
// Y[(n,t),(q,o)] by G[n,t,o] while summing over each example's tokens, and each query's dout
// columns are summed into register accumulators of the block's NB x QB outputs.
// Masked tokens are staged as zero rows of A and skipped (not multiplied) in the G epilogue, so
// NaN in them cannot leak. No [N, T, Q, dout] intermediate, no atomics (deterministic).
#include "score_engine.cuh"

namespace fastinf {
namespace cuda {

std::string score_dense(const void* A, const void* G, const void* M, const uint8_t* a_mask,
                        float* out, int64_t N, int64_t T, int64_t Q, int64_t din, int64_t dout,
                        int dtype, uintptr_t stream) {
  if (N <= 0 || Q <= 0) return std::string();
  auto st = reinterpret_cast<cudaStream_t>(stream);
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    return "score_dense: unsupported dtype code " + std::to_string(dtype);
  // No token, or no output row: every score is an empty sum.
  if (T <= 0 || dout <= 0) return gram::zero_out(out, N, Q, st, "score_dense memset");
  gram::Args p{};
  p.X1 = A;  // [N*T, din]
  p.Y1 = M;  // [Q*dout, din]
  p.X2 = G;  // [N*T, dout], the epilogue factor
  p.Y2 = nullptr;
  p.row_mask = a_mask;  // [N*T] or null
  p.col_mask = nullptr;
  p.out = out;  // [N, Q]
  p.N = N;
  p.Q = Q;
  p.T = T;
  p.SEG = dout;
  p.K1 = din;
  p.K2 = 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    return gram::launch<E, gram::kDense>(p, st, "score_dense launch");
  });
}

}  // namespace cuda
}  // namespace fastinf
