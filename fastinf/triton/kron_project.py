"""Triton kernel of ``kron_project``: ``Y[n] = Σ_t (P_outᵀ g_t)(P_inᵀ a_t)ᵀ``.

One program per (example, k_out tile, k_in tile) on a 1-D grid. Tokens are walked in blocks;
each block's projections ``A_n P_in`` and ``G_n P_out`` are built in registers (loops over din /
dout, ``tl.dot`` on the operands' own dtype: tensor cores for fp16/bf16) and contracted by an
fp32 ``tl.dot`` into the fp32 accumulator, so no ``[N, T, k]`` intermediate exists.
Precision (:mod:`fastinf.triton._common`): the fp32 dots, the last one included, are exact
unless torch's float32 matmul precision allows TF32 (then ~1e-3 relative, like torch.matmul).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import configs, device_guard, grid_1d, input_precision, upcast_dot

# ptxas -v (sm_90a, triton 3.6): no spills for these with fp32 or bf16 inputs (<= 140 registers);
# 64x64 output tiles spilled 28-32 B with fp32 inputs (BD 32 or 64, 4 or 8 warps): left out.
_CONFIGS = configs(triton.Config({"BO": 16, "BI": 16, "BT": 16, "BD": 32}, num_warps=4), [
    triton.Config({"BO": 32, "BI": 32, "BT": 32, "BD": 64}, num_warps=4, num_stages=3),
    triton.Config({"BO": 16, "BI": 16, "BT": 32, "BD": 32}, num_warps=4, num_stages=3),
])


@triton.autotune(configs=_CONFIGS, key=["din", "dout", "k_in", "k_out"])
@triton.jit
def _kron_kernel(A, G, PI, PO, M, Y, NT, din, dout, k_in, k_out,
                 HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, PRECISION32: tl.constexpr,
                 UPCAST: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                 BO: tl.constexpr, BI: tl.constexpr):
    num_o = tl.cdiv(k_out, BO)
    num_i = tl.cdiv(k_in, BI)
    pid = tl.program_id(0)
    n = (pid // (num_o * num_i)).to(tl.int64)
    rest = pid % (num_o * num_i)
    ro = (rest // num_i) * BO + tl.arange(0, BO)
    ri = (rest % num_i) * BI + tl.arange(0, BI)
    rd = tl.arange(0, BD)
    acc = tl.zeros((BO, BI), dtype=tl.float32)
    for t0 in range(0, NT, BT):
        rt = t0 + tl.arange(0, BT)
        rows = n * NT + rt                         # int64 token rows
        tok = rt < NT
        if HAS_MASK:
            mv = tl.load(M + rows, mask=tok, other=0)
            tok = tok & (mv != 0)
        aa = tl.zeros((BT, BI), dtype=tl.float32)
        for d0 in range(0, din, BD):
            dd = d0 + rd
            a = tl.load(A + rows[:, None] * din + dd[None, :],
                        mask=tok[:, None] & (dd[None, :] < din), other=0.0)
            p = tl.load(PI + dd.to(tl.int64)[:, None] * k_in + ri[None, :],
                        mask=(dd[:, None] < din) & (ri[None, :] < k_in), other=0.0)
            if UPCAST:  # interpreter only (its bf16 dot is broken)
                a, p = a.to(tl.float32), p.to(tl.float32)
            aa = tl.dot(a, p, aa, input_precision=PRECISION)
        gg = tl.zeros((BT, BO), dtype=tl.float32)
        for e0 in range(0, dout, BD):
            ee = e0 + rd
            g = tl.load(G + rows[:, None] * dout + ee[None, :],
                        mask=tok[:, None] & (ee[None, :] < dout), other=0.0)
            p = tl.load(PO + ee.to(tl.int64)[:, None] * k_out + ro[None, :],
                        mask=(ee[:, None] < dout) & (ro[None, :] < k_out), other=0.0)
            if UPCAST:
                g, p = g.to(tl.float32), p.to(tl.float32)
            gg = tl.dot(g, p, gg, input_precision=PRECISION)
        acc = tl.dot(tl.trans(gg), aa, acc, input_precision=PRECISION32)
    ym = (ro[:, None] < k_out) & (ri[None, :] < k_in)
    tl.store(Y + (n * k_out + ro[:, None]) * k_in + ri[None, :], acc, mask=ym)


def kron_project_triton(A, G, P_in, P_out, a_mask=None) -> torch.Tensor:
    """A [N,T,din], G [N,T,dout], P_in [din,k_in], P_out [dout,k_out] (one dtype: fp32, fp16
    or bf16) -> float32 [N,k_out,k_in]."""
    N, T, din = A.shape
    dout = G.shape[2]
    k_in, k_out = P_in.shape[1], P_out.shape[1]
    A, G, P_in, P_out = (x.contiguous() for x in (A, G, P_in, P_out))
    out = torch.zeros(N, k_out, k_in, dtype=torch.float32, device=A.device)
    if N == 0 or T == 0:
        return out
    m = a_mask.contiguous().view(torch.uint8) if a_mask is not None else A

    def grid(meta):
        return grid_1d("kron_project",
                       N * triton.cdiv(k_out, meta["BO"]) * triton.cdiv(k_in, meta["BI"]))

    with device_guard(A):
        _kron_kernel[grid](A, G, P_in, P_out, m, out, T, din, dout, k_in, k_out,
                           HAS_MASK=a_mask is not None, PRECISION=input_precision(A.dtype),
                           PRECISION32=input_precision(torch.float32), UPCAST=upcast_dot(A.dtype))
    return out
