// ekfac_lambda on CUDA, on rotated factors At = A Q_A [N,T,din], Gt = G Q_S [N,T,dout]:
//   out[o,i] = sum_n D_n[o,i]^2,   D_n = sum_t Gt[n,t,:]^T At[n,t,:]   ([dout, din])
// Tiled like the score engine (score_engine.cuh): a block owns a 64 x 64 tile of out; its 256 threads
// hold 4 x 4 outputs each, o = o0 + 4*ty + a and i = i0 + 4*tx + b (ty, tx < 16). The block walks
// the flattened token rows r = (n, t) in steps of BT = 16: the 16 rows' slices Gt[r, o0:o0+64]
// and At[r, i0:i0+64] are staged in shared memory (contiguous in o / i: coalesced 16-byte cp.async,
// double-buffered so the next step's copy overlaps this step's math), each thread reads one float4
// of each per row (a warp reads 2 Gt addresses and 256 contiguous At bytes: no bank conflict) and
// updates its 4 x 4 block of D_n in registers. At the last row of an example -- a block-uniform
// test, rows are shared by all threads -- it adds D*D to its outputs and clears D. Every staged
// value is reused by 64 threads (the old kernel streamed both rows per output from global memory).
// Masked rows and out-of-range rows/columns are staged as zeros (a select: masked garbage is never
// read). fp32 accumulation in a fixed order: deterministic, one plain store per output.
// Few tiles (small din x dout) would leave SMs idle: then the examples are split over grid.z
// blocks per tile (whole examples, >= 256 rows each) writing partial sums to a stream-ordered
// workspace, summed in split order by a second kernel (deterministic for a given GPU; the split
// count follows its SM count). Without the workspace (allocation failed) one block per tile.
#include "score_engine.cuh"

namespace fastinf {
namespace cuda {
namespace {

constexpr int TILE = 64;     // outputs per block edge (o and i)
constexpr int BT = 16;       // token rows per step
constexpr int THREADS = 256;  // 16 x 16, 4 x 4 outputs each
static_assert(BT * TILE / 4 == THREADS, "one 16-byte chunk per thread and operand per step");

// Stages rows [r0, r0 + BT) x columns [c0, c0 + TILE) of X ([NR, D] row-major) as fp32 into
// sh[t * TILE + c]: this thread's 4 consecutive columns of one row. `vec`: float input, D % 4 == 0
// and X 16-byte aligned, so a chunk is wholly inside c < D (one cp.async) or wholly outside.
template <typename E>
__device__ __forceinline__ void stage_rows(float* __restrict__ sh, const E* __restrict__ X,
                                           int64_t r0, int64_t NR,
                                           const uint8_t* __restrict__ mask, int64_t D,
                                           int64_t c0, bool vec) {
  const int t = threadIdx.x / (TILE / 4), c = (threadIdx.x % (TILE / 4)) * 4;
  float* dst = sh + t * TILE + c;
  const int64_t r = r0 + t, cc = c0 + c;
  const bool ok = r < NR && cc < D && (mask == nullptr || mask[r] != 0);
  if constexpr (std::is_same<E, float>::value) {
    if (ok && vec) {
      cp_async16(dst, X + r * D + cc);
      return;
    }
  }
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  if (ok) {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (cc + e < D) v[e] = to_f32(X[r * D + cc + e]);
  }
  *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
}

template <typename E>
__global__ void __launch_bounds__(THREADS) ekfac_lambda_tiles(
    const E* __restrict__ At, const E* __restrict__ Gt, const uint8_t* __restrict__ a_mask,
    float* __restrict__ out, int64_t N, int64_t T, int64_t din, int64_t dout,
    int64_t n_per_split) {
  __shared__ __align__(16) float sm[2][2][BT * TILE];  // [stage][Gt, At][row * TILE + col]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TILE;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * TILE;
  // this block's examples [n_begin, n_end): rows [r_begin, NR) of the flattened tokens
  const int64_t n_begin = static_cast<int64_t>(blockIdx.z) * n_per_split;
  const int64_t n_end = n_begin + n_per_split < N ? n_begin + n_per_split : N;
  const int64_t r_begin = n_begin * T;
  const int64_t NR = n_end * T;
  out += static_cast<int64_t>(blockIdx.z) * dout * din;  // its partial sum (splits > 1)
  constexpr bool kFloat = std::is_same<E, float>::value;
  const bool vec_g = kFloat && dout % 4 == 0 && aligned16(Gt);
  const bool vec_a = kFloat && din % 4 == 0 && aligned16(At);

  float d[4][4], lam[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) d[a][b] = lam[a][b] = 0.f;

  const int64_t steps = NR > r_begin ? (NR - r_begin + BT - 1) / BT : 0;
  int64_t next_end = r_begin + T - 1;  // flattened row of the current example's last token
  if (steps > 0) {
    stage_rows(sm[0][0], Gt, r_begin, NR, a_mask, dout, o0, vec_g);
    stage_rows(sm[0][1], At, r_begin, NR, a_mask, din, i0, vec_a);
  }
  cp_async_commit();
  for (int64_t s = 0; s < steps; ++s) {
    const int cur = static_cast<int>(s & 1);
    if (s + 1 < steps) {
      stage_rows(sm[cur ^ 1][0], Gt, r_begin + (s + 1) * BT, NR, a_mask, dout, o0, vec_g);
      stage_rows(sm[cur ^ 1][1], At, r_begin + (s + 1) * BT, NR, a_mask, din, i0, vec_a);
    }
    cp_async_commit();  // possibly empty: keeps "all but the newest group" = step s
    cp_async_wait<1>();
    __syncthreads();
    const float* Gs = sm[cur][0];
    const float* As = sm[cur][1];
    const int64_t r0 = r_begin + s * BT;
#pragma unroll
    for (int t = 0; t < BT; ++t) {
      fma_outer4(d, *reinterpret_cast<const float4*>(Gs + t * TILE + 4 * ty),
                 *reinterpret_cast<const float4*>(As + t * TILE + 4 * tx));
      if (r0 + t == next_end) {  // uniform over the block
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            lam[a][b] = fmaf(d[a][b], d[a][b], lam[a][b]);
            d[a][b] = 0.f;
          }
        next_end += T;
      }
    }
    __syncthreads();  // before stage `cur` is refilled by step s + 2
  }

#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t o = o0 + 4 * ty + a;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t i = i0 + 4 * tx + b;
      if (o < dout && i < din) out[o * din + i] = lam[a][b];
    }
  }
}

// out[x] = sum over z of part[z][x], z in order: the split-example partial sums, deterministic.
__global__ void sum_splits(const float* __restrict__ part, float* __restrict__ out, int64_t count,
                           int splits) {
  for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < count;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += part[z * count + x];
    out[x] = s;
  }
}

// Splits of the examples: when the 64 x 64 output tiles are fewer than 2 blocks per SM, the
// examples are divided among grid.z = splits blocks per tile (each >= 256 token rows), whose
// partial sums go to a stream-ordered workspace (<= 256 MiB) summed in a fixed order after.
int64_t choose_splits(int64_t tiles, int64_t N, int64_t T, int64_t din, int64_t dout) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 1;
  }
  const int64_t want = (2 * static_cast<int64_t>(sms) + tiles - 1) / tiles;
  const int64_t by_rows = N * T / 256;
  const int64_t by_bytes = (int64_t{256} << 20) / (din * dout * 4);
  int64_t splits = want;
  for (int64_t cap : {by_rows, by_bytes, N, int64_t{64}}) splits = cap < splits ? cap : splits;
  return splits > 1 ? splits : 1;
}

}  // namespace

std::string ekfac_lambda(const void* At, const void* Gt, const uint8_t* a_mask, float* out,
                         int64_t N, int64_t T, int64_t din, int64_t dout, int dtype,
                         uintptr_t stream) {
  if (din == 0 || dout == 0) return std::string();
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t gx = (din + TILE - 1) / TILE;
  const int64_t gy = (dout + TILE - 1) / TILE;
  if (gy > 65535) return "ekfac_lambda: dout > 4194240 not supported by this kernel";
  if (gx > 2147483647LL) return "ekfac_lambda: din too large for this kernel";
  int64_t splits = N > 0 ? choose_splits(gx * gy, N, T, din, dout) : 1;
  const int64_t n_per_split = splits > 1 ? (N + splits - 1) / splits : (N > 0 ? N : 1);
  if (splits > 1) splits = (N + n_per_split - 1) / n_per_split;  // no empty split
  float* part = nullptr;
  if (splits > 1 &&
      cudaMallocAsync(reinterpret_cast<void**>(&part),
                      static_cast<size_t>(splits * dout * din) * sizeof(float), st) != cudaSuccess) {
    cudaGetLastError();  // no workspace: one block per tile walks all the examples
    part = nullptr;
  }
  const int64_t n_per = part != nullptr ? n_per_split : (N > 0 ? N : 1);
  const unsigned gz = part != nullptr ? static_cast<unsigned>(splits) : 1u;
  std::string err = dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), gz);
    ekfac_lambda_tiles<E><<<grid, THREADS, 0, st>>>(
        static_cast<const E*>(At), static_cast<const E*>(Gt), a_mask,
        part != nullptr ? part : out, N, T, din, dout, n_per);
    return launch_error("ekfac_lambda launch");
  });
  if (part != nullptr) {
    if (err.empty()) {
      const int64_t count = din * dout;
      const int64_t blocks = (count + 255) / 256 < 65535 ? (count + 255) / 256 : 65535;
      sum_splits<<<static_cast<unsigned>(blocks), 256, 0, st>>>(part, out, count,
                                                               static_cast<int>(gz));
      err = launch_error("ekfac_lambda split sum launch");
    }
    if (cudaFreeAsync(part, st) != cudaSuccess && err.empty())
      err = launch_error("ekfac_lambda workspace free");
  }
  return err;
}

}  // namespace cuda
}  // namespace fastinf
