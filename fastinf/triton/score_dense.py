"""Triton kernel of ``score_dense`` (the fused "token" contraction).

Formula::

    S[n, q] = Σ_t G[n,t]ᵀ M[q] A[n,t]  =  Σ_t Σ_e G[n,t,e] · (Σ_d M[q,e,d] A[n,t,d])

with ``A [N, T, din]``, ``G [N, T, dout]``, ``M [Q, dout, din]`` and an optional token mask
``a_mask [N, T]`` (False = the token contributes nothing, even if its values are NaN/Inf).
Accumulation is float32; the result is float32 ``[N, Q]``.

Tiling
------
* a **row tile** of ``BLOCK_R`` token rows holds ``BN = BLOCK_R // BT`` examples × ``BT`` tokens
  (row ``r`` is example ``n0 + r // BT``, token ``t0 + r % BT``; ``BT`` from
  :func:`fastinf.triton._common.token_block`, 1 for T = 1, up to BLOCK_R for long
  sequences), so a tile never straddles examples incorrectly;
* a **column tile** is one query ``q`` × ``BLOCK_E`` output features ``e``.

One program owns ``out[n0:n0+BN, q]``: it loops over the token blocks ``t0`` and the dout blocks
``e0``, computes ``Y = A_tile · M[q, e0:e0+BLOCK_E, :]ᵀ`` with ``tl.dot`` over din (inputs in
their dtype, fp32 accumulator), and in the epilogue multiplies by ``G_tile[:, e0:e0+BLOCK_E]``
and reduces over e into a per-row fp32 vector. Masked / out-of-range rows are replaced by 0
(``where``, a select: NaN/Inf never leak); after the dout loop the rows are segment-summed over
the example's tokens (``reshape(·, [BN, BT]).sum(1)``) into the accumulator.
``[N, T, Q, dout]`` never exists; each output is written once (no atomics, deterministic).
Programs are ordered so that ``GROUP`` row tiles run against the same query (``M[q]`` stays in
L2).

fp32 inputs follow torch's float32 matmul precision (exact fp32 dots unless TF32 is allowed),
block sizes are autotuned on GPU (key: din, dout, T bucket, dtype; ``FASTINF_TRITON_AUTOTUNE=0``
takes the first config) and fixed and small under the interpreter (``TRITON_INTERPRET=1``).
Strides, int64/int32 offsets and the zero-padding of din/dout to multiples of 16 on CUDA are as
in :mod:`fastinf.triton.score_factored`; the row offset ``e * sMe`` of M[q] is int64 (``dout·din``
of one M[q] can pass 2³¹).
"""
import torch
import triton
import triton.language as tl

from ._common import (align_features, configs, device_guard, grid_1d, input_precision,
                      int32_safe, mask_arg, offsets64, pow2_bucket, static_sizes, tile_ids,
                      token_block, upcast_dot)


def _configs():
    return configs(triton.Config({"BLOCK_R": 32, "BLOCK_E": 32, "BLOCK_K": 32}, num_warps=4), [
        triton.Config({"BLOCK_R": 64, "BLOCK_E": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_E": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_E": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_E": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_E": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    ])


@triton.autotune(configs=_configs(), key=["din", "dout", "T_KEY"])
@triton.heuristics({"BT": lambda a: token_block(a["T"], a["BLOCK_R"])})
@triton.jit
def _score_dense_kernel(
    A, G, M, AM, OUT,
    N, T, Q, din, dout,
    sAn, sAt, sAk, sGn, sGt, sGe, sMq, sMe, sMk,
    sAMn, sAMt, sOn, sOq,
    T_KEY,  # autotune bucket only
    T_C: tl.constexpr, DIN_C: tl.constexpr, DOUT_C: tl.constexpr,
    HAS_AM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BT: tl.constexpr, GROUP: tl.constexpr = 8,
):
    BN: tl.constexpr = BLOCK_R // BT
    num_r = tl.cdiv(N, BN)
    pid_r, q = tile_ids(tl.program_id(0), num_r, Q, GROUP)
    q64 = q.to(tl.int64)

    rr = tl.arange(0, BLOCK_R)
    ee = tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    n = pid_r * BN + rr // BT                     # [BLOCK_R] example of each row
    n_ok = n < N
    n64 = n.to(tl.int64)
    m_q = M + q64 * sMq

    # Out-of-range rows are clamped to a valid example/token so that the loads need only the
    # K / dout masks; they (and masked tokens, even NaN ones) are dropped by the where below.
    n_c = tl.minimum(n, N - 1).to(tl.int64)

    acc = tl.zeros((BN,), dtype=tl.float32)
    for t0 in range(0, T_C if T_C > 0 else T, BT):
        t = t0 + rr % BT
        r_ok = n_ok & (t < T)
        if HAS_AM:
            am = tl.load(AM + n64 * sAMn + t * sAMt, mask=r_ok, other=0)
            r_ok = r_ok & (am != 0)
        t_c = tl.minimum(t, T - 1)
        a_row = A + n_c * sAn + t_c * sAt         # [BLOCK_R] row pointers
        g_row = G + n_c * sGn + t_c * sGt
        rows = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for e0 in range(0, DOUT_C if DOUT_C > 0 else dout, BLOCK_E):
            e = e0 + ee
            e_ok = e < dout
            m_col = m_q + offsets64(tl.minimum(e, dout - 1), sMe)   # [BLOCK_E] rows of M[q]
            y = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
            for k0 in range(0, DIN_C if DIN_C > 0 else din, BLOCK_K):
                k = k0 + kk
                k_ok = k < din
                a = tl.load(a_row[:, None] + k[None, :] * sAk, mask=k_ok[None, :], other=0.0)
                m = tl.load(m_col[None, :] + k[:, None] * sMk, mask=k_ok[:, None], other=0.0)
                if UPCAST:  # interpreter only (its bf16 dot is broken)
                    a, m = a.to(tl.float32), m.to(tl.float32)
                y = tl.dot(a, m, y, input_precision=PRECISION)
            g = tl.load(g_row[:, None] + e[None, :] * sGe, mask=e_ok[None, :], other=0.0)
            rows += tl.sum(y * g.to(tl.float32), axis=1)
        # select, not multiply: NaN/Inf of masked or clamped rows never leak
        rows = tl.where(r_ok, rows, 0.0)
        acc += tl.sum(tl.reshape(rows, (BN, BT)), axis=1)      # over the example's tokens

    on = pid_r * BN + tl.arange(0, BN)
    tl.store(OUT + on.to(tl.int64) * sOn + q64 * sOq, acc, mask=on < N)


def score_dense_triton(A, G, M, a_mask=None, align=None) -> torch.Tensor:
    """``S[n,q] = Σ_t G[n,t]ᵀ M[q] A[n,t]`` by the fused Triton kernel.

    A ``[N, T, din]``, G ``[N, T, dout]``, M ``[Q, dout, din]`` (one float dtype, one device,
    any strides), a_mask ``[N, T]`` bool or None. Returns float32 ``[N, Q]``. ``align``
    (default: on CUDA) zero-pads din/dout to a multiple of 16 first (see
    :func:`fastinf.triton._common.align_features`).
    """
    N, T, din = A.shape
    Q, dout, _ = M.shape
    out = torch.empty(N, Q, dtype=torch.float32, device=A.device)
    if N == 0 or Q == 0:
        return out
    if T == 0:
        return out.zero_()
    if A.is_cuda if align is None else align:
        A, G, M = align_features([A, G, M], [(-1,), (-1,), (-1, -2)])
        din, dout = A.shape[-1], G.shape[-1]
    A, G, M = (int32_safe(x) for x in (A, G, M))
    am, sAMn, sAMt, has_am = mask_arg(a_mask, out)

    def grid(meta):
        return grid_1d("score_dense", triton.cdiv(N, meta["BLOCK_R"] // meta["BT"]) * Q)

    with device_guard(A):
        _score_dense_kernel[grid](
            A, G, M, am, out,
            N, T, Q, din, dout,
            *A.stride(), *G.stride(), *M.stride(),
            sAMn, sAMt, *out.stride(),
            pow2_bucket(T), *static_sizes(T, din, dout),
            HAS_AM=has_am, PRECISION=input_precision(A.dtype), UPCAST=upcast_dot(A.dtype),
        )
    return out
