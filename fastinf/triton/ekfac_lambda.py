"""Triton kernel of ``ekfac_lambda`` on rotated factors ``At = A Q_A``, ``Gt = G Q_S``.

``out[o, i] = Σ_n (Σ_t Gt[n,t,o] At[n,t,i])²``: one program per ``[BO, BI]`` output tile loops
over examples and token blocks (``tl.dot`` of the transposed gradient block with the input
block), squares and accumulates in float32 registers. Deterministic.
N and T are compile-time constants (loop bounds; the interpreter of triton 3.6 cannot loop
over runtime scalars here): one compilation per (batch size, tokens), i.e. ~2 per layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _ekfac_lambda_kernel(At, Gt, Mask, Out, din, dout, N: tl.constexpr, T: tl.constexpr,
                         HAS_MASK: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr,
                         BI: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_o = pid_o * BO + tl.arange(0, BO)
    offs_i = pid_i * BI + tl.arange(0, BI)
    acc = tl.zeros((BO, BI), dtype=tl.float32)
    for n in range(0, N):
        r = tl.zeros((BO, BI), dtype=tl.float32)
        for t0 in range(0, T, BT):
            offs_t = t0 + tl.arange(0, BT)
            tok = offs_t < T
            if HAS_MASK:
                keep = tl.load(Mask + n * T + offs_t, mask=tok, other=0)
                tok = tok & (keep != 0)
            rows = (n * T + offs_t).to(tl.int64)
            g = tl.load(Gt + rows[:, None] * dout + offs_o[None, :],
                        mask=tok[:, None] & (offs_o[None, :] < dout), other=0.0)
            a = tl.load(At + rows[:, None] * din + offs_i[None, :],
                        mask=tok[:, None] & (offs_i[None, :] < din), other=0.0)
            r += tl.dot(tl.trans(g.to(tl.float32)), a.to(tl.float32), input_precision="ieee")
        acc += r * r
    tl.store(Out + offs_o[:, None] * din + offs_i[None, :], acc,
             mask=(offs_o[:, None] < dout) & (offs_i[None, :] < din))


def ekfac_lambda_triton(At: torch.Tensor, Gt: torch.Tensor,
                        a_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[dout, din]`` float32 from contiguous ``At`` [N, T, din], ``Gt`` [N, T, dout]."""
    N, T, din = At.shape
    dout = Gt.shape[2]
    out = torch.zeros(dout, din, dtype=torch.float32, device=At.device)
    if N == 0 or T == 0:
        return out
    BO = max(16, min(64, triton.next_power_of_2(dout)))
    BI = max(16, min(64, triton.next_power_of_2(din)))
    BT = max(16, min(32, triton.next_power_of_2(T)))
    mask = a_mask.view(torch.uint8) if a_mask is not None else At
    grid = (triton.cdiv(dout, BO), triton.cdiv(din, BI))
    _ekfac_lambda_kernel[grid](At, Gt, mask, out, din, dout, N=N, T=T, HAS_MASK=a_mask is not None,
                               BT=BT, BO=BO, BI=BI)
    return out
