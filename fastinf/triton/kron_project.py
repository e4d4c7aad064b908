"""Triton kernel of ``kron_project``: ``Y[n] = Σ_t (P_outᵀ g_t)(P_inᵀ a_t)ᵀ``.

One program per (example, k_out tile, k_in tile). Tokens are walked in blocks; each block's
projections ``A_n P_in`` and ``G_n P_out`` are built in registers (loops over din / dout) and
contracted by ``tl.dot`` into the fp32 accumulator, so no ``[N, T, k]`` intermediate exists.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _kron_kernel(A, G, PI, PO, M, Y, NT, din, dout, k_in, k_out,
                 HAS_MASK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                 BO: tl.constexpr, BI: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ro = tl.program_id(1) * BO + tl.arange(0, BO)
    ri = tl.program_id(2) * BI + tl.arange(0, BI)
    rd = tl.arange(0, BD)
    acc = tl.zeros((BO, BI), dtype=tl.float32)
    for t0 in range(0, NT, BT):
        rt = t0 + tl.arange(0, BT)
        tok = rt < NT
        if HAS_MASK:
            mv = tl.load(M + n * NT + rt, mask=tok, other=0)
            tok = tok & (mv != 0)
        aa = tl.zeros((BT, BI), dtype=tl.float32)
        for d0 in range(0, din, BD):
            dd = d0 + rd
            a = tl.load(A + (n * NT + rt[:, None]) * din + dd[None, :],
                        mask=tok[:, None] & (dd[None, :] < din), other=0.0).to(tl.float32)
            p = tl.load(PI + dd[:, None] * k_in + ri[None, :],
                        mask=(dd[:, None] < din) & (ri[None, :] < k_in), other=0.0).to(tl.float32)
            aa += tl.dot(a, p, input_precision="ieee")
        gg = tl.zeros((BT, BO), dtype=tl.float32)
        for e0 in range(0, dout, BD):
            ee = e0 + rd
            g = tl.load(G + (n * NT + rt[:, None]) * dout + ee[None, :],
                        mask=tok[:, None] & (ee[None, :] < dout), other=0.0).to(tl.float32)
            p = tl.load(PO + ee[:, None] * k_out + ro[None, :],
                        mask=(ee[:, None] < dout) & (ro[None, :] < k_out), other=0.0).to(tl.float32)
            gg += tl.dot(g, p, input_precision="ieee")
        acc += tl.dot(tl.trans(gg), aa, input_precision="ieee")
    ym = (ro[:, None] < k_out) & (ri[None, :] < k_in)
    tl.store(Y + (n * k_out + ro[:, None]) * k_in + ri[None, :], acc, mask=ym)


def kron_project_triton(A, G, P_in, P_out, a_mask=None) -> torch.Tensor:
    """A [N,T,din], G [N,T,dout], P_in [din,k_in], P_out [dout,k_out] -> float32 [N,k_out,k_in]."""
    N, T, din = A.shape
    dout = G.shape[2]
    k_in, k_out = P_in.shape[1], P_out.shape[1]
    A, G, P_in, P_out = (x.contiguous() for x in (A, G, P_in, P_out))
    out = torch.zeros(N, k_out, k_in, dtype=torch.float32, device=A.device)
    if N == 0 or T == 0:
        return out
    m = a_mask.contiguous().view(torch.uint8) if a_mask is not None else A
    BO = 16 if k_out <= 16 else 32
    BI = 16 if k_in <= 16 else 32
    grid = (N, triton.cdiv(k_out, BO), triton.cdiv(k_in, BI))
    _kron_kernel[grid](A, G, P_in, P_out, m, out, T, din, dout, k_in, k_out,
                       HAS_MASK=a_mask is not None, BT=16, BD=32, BO=BO, BI=BI)
    return out
