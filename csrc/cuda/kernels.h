// CUDA launchers of fastinf. No torch headers: raw device pointers, shapes and the caller's
// stream (a cudaStream_t passed as an integer handle). Every launcher checks its launch and
// returns an empty string on success or a message describing the CUDA error.
#pragma once
#include <cstdint>
#include <string>

namespace fastinf {
namespace cuda {

// Element types of the inputs; accumulation and outputs are always float32.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// S[n,q] = sum_{t,s} (A[n,t]·V[q,s]) * (G[n,t]·U[q,s]); shapes as in cpu/kernels.h.
std::string score_factored(const void* A, const void* G, const void* V, const void* U,
                           const uint8_t* a_mask, const uint8_t* v_mask, float* out,
                           int64_t N, int64_t T, int64_t Q, int64_t S, int64_t din,
                           int64_t dout, int dtype, uintptr_t stream);

// S[n,q] = sum_t G[n,t]^T M[q] A[n,t]; shapes as in cpu/kernels.h.
std::string score_dense(const void* A, const void* G, const void* M, const uint8_t* a_mask,
                        float* out, int64_t N, int64_t T, int64_t Q, int64_t din,
                        int64_t dout, int dtype, uintptr_t stream);

// Number of visible devices, or -1 with `error` set when the runtime/driver is unusable.
int device_count(std::string* error);
int runtime_version();

// out[o,i] = sum_n (sum_t Gt[n,t,o] * At[n,t,i])^2; shapes as in cpu/kernels.h.
std::string ekfac_lambda(const void* At, const void* Gt, const uint8_t* a_mask, float* out,
                         int64_t N, int64_t T, int64_t din, int64_t dout, int dtype,
                         uintptr_t stream);

// Y[n] = sum_t (P_out^T G[n,t]) (P_in^T A[n,t])^T; shapes as in cpu/kernels.h. A, G, P_in, P_out
// share the element type `dtype`; out is float32.
std::string kron_project(const void* A, const void* G, const void* P_in, const void* P_out,
                         const uint8_t* a_mask, float* out, int64_t N, int64_t T, int64_t din,
                         int64_t dout, int64_t k_in, int64_t k_out, int dtype, uintptr_t stream);

// Y = X Phi^T with Phi generated on the fly (same hash as the CPU kernel); out float32 [N,k].
std::string jl_project(const void* X, float* out, int64_t N, int64_t p, int64_t k, uint32_t key,
                       int kind, int dtype, uintptr_t stream);

}  // namespace cuda
}  // namespace fastinf
