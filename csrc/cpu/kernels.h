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

// out[o,i] = sum_n (sum_{r of n} Gt[r,o] * At[r,i])^2 on the rotated kept tokens
// (At = A Q_A, Gt = G Q_S, masked tokens dropped): At [R,din], Gt [R,dout], example n owns rows
// offsets[n] .. offsets[n+1] (offsets [N+1], offsets[0] = 0, offsets[N] = R), out [dout,din]
// (overwritten). chunk_rows: tokens per chunk of examples (<= 0: sized for the L2 cache);
// isa: the best instruction set to use (0 any, 1 baseline, 2 AVX2+FMA, 3 AVX-512).
void ekfac_lambda_f32(const float* At, const float* Gt, const int64_t* offsets, float* out,
                      int64_t N, int64_t din, int64_t dout, int64_t chunk_rows, int isa);
// The instruction set ekfac_lambda_f32 runs for `isa` on this CPU (1, 2 or 3; see above).
int ekfac_lambda_isa(int isa);

// Y[n] = sum_t (P_out^T G[n,t]) (P_in^T A[n,t])^T
// A [N,T,din], G [N,T,dout], P_in [din,k_in], P_out [dout,k_out], a_mask [N,T], out [N,k_out,k_in]
void kron_project_f32(const float* A, const float* G, const float* P_in, const float* P_out,
                      const uint8_t* a_mask, float* out, int64_t N, int64_t T, int64_t din,
                      int64_t dout, int64_t k_in, int64_t k_out);

// Y = X Phi^T, Phi [k,p] generated on the fly from (key, row, column) (see common/jl_hash.h);
// kind 0 rademacher, 1 normal. X [N,p], out [N,k].
void jl_project_f32(const float* X, float* out, int64_t N, int64_t p, int64_t k, uint32_t key,
                    int kind);
// Floats of thread-local workspace one jl_project task uses (its memory bound per thread).
int64_t jl_project_tile_floats();

}  // namespace cpu
}  // namespace fastinf
