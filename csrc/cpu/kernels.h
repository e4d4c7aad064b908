// CPU kernels of fastinf. Plain C++ (OpenMP), no torch headers.
// Every pointer is to a C-contiguous array; shapes are given explicitly. Masks are bytes
// (0 = token excluded, nonzero = kept) or nullptr for "all tokens kept". Outputs are
// overwritten (not accumulated into) unless the function says otherwise.
#pragma once
#include <cstdint>

namespace fastinf {
namespace cpu {

// S[n,q] = sum_{t,s} (A[n,t]·V[q,s]) * (G[n,t]·U[q,s])
// A [N,T,din], G [N,T,dout], V [Q,S,din], U [Q,S,dout], a_mask [N,T], v_mask [Q,S], out [N,Q]
void score_factored_f32(const float* A, const float* G, const float* V, const float* U,
                        const uint8_t* a_mask, const uint8_t* v_mask, float* out,
                        int64_t N, int64_t T, int64_t Q, int64_t S, int64_t din, int64_t dout);

// S[n,q] = sum_t G[n,t]^T M[q] A[n,t]
// A [N,T,din], G [N,T,dout], M [Q,dout,din], a_mask [N,T], out [N,Q]
void score_dense_f32(const float* A, const float* G, const float* M, const uint8_t* a_mask,
                     float* out, int64_t N, int64_t T, int64_t Q, int64_t din, int64_t dout);

int num_threads();

}  // namespace cpu
}  // namespace fastinf

// --- ekfac_lambda
namespace fastinf {
namespace cpu {
// out[o,i] = sum_n (sum_t Gt[n,t,o] * At[n,t,i])^2 on rotated factors (At = A Q_A, Gt = G Q_S)
// At [N,T,din], Gt [N,T,dout], a_mask [N,T], out [dout,din] (overwritten)
void ekfac_lambda_f32(const float* At, const float* Gt, const uint8_t* a_mask, float* out,
                      int64_t N, int64_t T, int64_t din, int64_t dout);
}  // namespace cpu
}  // namespace fastinf
