// score_factored on CUDA: S[n,q] = sum_{t,s} (A[n,t]·V[q,s]) (G[n,t]·U[q,s]).
//
// Design (details in score_engine.cuh, "token Gram engine"): the token rows (n,t) of A|G and the
// token columns (q,s) of V|U are flattened; a block owns NB examples x QB queries
// (NB = max(1, 64 / T), QB = max(1, 64 / S)) and walks its rows/columns in 64 x 64 chunks. For
// each chunk it computes both Gram tiles A·Vᵀ (K-loop over din) and G·Uᵀ (K-loop over dout)
// with fp32 accumulation -- SIMT 4x4 register tiles for float32, WMMA tensor cores for
// f16/bf16 -- multiplies them elementwise, and reduces the 64 x 64 product over each example's
// rows and each query's columns into register accumulators of the block's NB x QB outputs.
// Masked tokens (a_mask / v_mask == 0) are staged as zero rows, so NaN in them cannot leak.
// No [N, T, Q, S] intermediate, no atomics (deterministic), one plain store per output.
#include "score_engine.cuh"

namespace fastinf {
namespace cuda {

std::string score_factored(const void* A, const void* G, const void* V, const void* U,
                           const uint8_t* a_mask, const uint8_t* v_mask, float* out, int64_t N,
                           int64_t T, int64_t Q, int64_t S, int64_t din, int64_t dout, int dtype,
                           uintptr_t stream) {
  if (N <= 0 || Q <= 0) return std::string();
  auto st = reinterpret_cast<cudaStream_t>(stream);
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    return "score_factored: unsupported dtype code " + std::to_string(dtype);
  // No token on either side: every score is an empty sum.
  if (T <= 0 || S <= 0) return gram::zero_out(out, N, Q, st, "score_factored memset");
  gram::Args p{};
  p.X1 = A;  // [N*T, din]
  p.Y1 = V;  // [Q*S, din]
  p.X2 = G;  // [N*T, dout]
  p.Y2 = U;  // [Q*S, dout]
  p.row_mask = a_mask;  // [N*T] or null
  p.col_mask = v_mask;  // [Q*S] or null
  p.out = out;          // [N, Q]
  p.N = N;
  p.Q = Q;
  p.T = T;
  p.SEG = S;
  p.K1 = din;
  p.K2 = dout;
  return dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    return gram::launch<E, gram::kFactored>(p, st, "score_factored launch");
  });
}

}  // namespace cuda
}  // namespace fastinf
