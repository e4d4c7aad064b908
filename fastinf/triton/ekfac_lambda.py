"""Triton kernel of ``ekfac_lambda`` on rotated factors ``At = A Q_A``, ``Gt = G Q_S``.

``out[o, i] = Σ_n (Σ_t Gt[n,t,o] At[n,t,i])²``: one program per ``[BO, BI]`` output tile loops
over examples and token blocks (``tl.dot`` of the transposed gradient block with the input
block, operands in their dtype, fp32 accumulator: see :mod:`fastinf.triton._common` for the
precision rule), squares and accumulates in float32 registers. Deterministic (no atomics).
N and T are runtime arguments: one compilation serves every batch shape (Triton still
specialises the values 1 and multiples of 16, a handful of variants at most). Row offsets
``(n·T + t)·din`` and the output offsets ``o·din`` are int64.
TF32: with fp32 factors and ``torch.set_float32_matmul_precision("high")`` the inner dots use
TF32 (~1e-3 relative error on each per-example sum, squared into λ): allowed because λ only
damps the inverse, but off by default like ``torch.matmul``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (configs, device_guard, grid_1d, input_precision, pow2_bucket, tile_ids,
                      upcast_dot)

_CONFIGS = configs(triton.Config({"BO": 32, "BI": 32, "BT": 16}, num_warps=4), [
    triton.Config({"BO": 64, "BI": 64, "BT": 32}, num_warps=4, num_stages=3),
    triton.Config({"BO": 128, "BI": 64, "BT": 32}, num_warps=8, num_stages=3),
    triton.Config({"BO": 64, "BI": 128, "BT": 32}, num_warps=8, num_stages=3),
    triton.Config({"BO": 64, "BI": 64, "BT": 64}, num_warps=4, num_stages=3),
])


@triton.autotune(configs=_CONFIGS, key=["din", "dout", "T_KEY"])
@triton.jit
def _ekfac_lambda_kernel(At, Gt, Mask, Out, N, T, din, dout, T_KEY,
                         HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BT: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                         GROUP: tl.constexpr = 8):
    pid_o, pid_i = tile_ids(tl.program_id(0), tl.cdiv(dout, BO), tl.cdiv(din, BI), GROUP)
    offs_o = pid_o * BO + tl.arange(0, BO)
    offs_i = pid_i * BI + tl.arange(0, BI)
    acc = tl.zeros((BO, BI), dtype=tl.float32)
    for n in range(0, N):
        r = tl.zeros((BO, BI), dtype=tl.float32)
        for t0 in range(0, T, BT):
            offs_t = t0 + tl.arange(0, BT)
            rows = tl.cast(n, tl.int64) * T + offs_t     # int64: N·T·din can pass 2³¹
            tok = offs_t < T
            if HAS_MASK:
                keep = tl.load(Mask + rows, mask=tok, other=0)
                tok = tok & (keep != 0)
            g = tl.load(Gt + rows[:, None] * dout + offs_o[None, :],
                        mask=tok[:, None] & (offs_o[None, :] < dout), other=0.0)
            a = tl.load(At + rows[:, None] * din + offs_i[None, :],
                        mask=tok[:, None] & (offs_i[None, :] < din), other=0.0)
            if UPCAST:  # interpreter only (its bf16 dot is broken)
                g, a = g.to(tl.float32), a.to(tl.float32)
            r = tl.dot(tl.trans(g), a, r, input_precision=PRECISION)
        acc += r * r
    tl.store(Out + offs_o.to(tl.int64)[:, None] * din + offs_i[None, :], acc,
             mask=(offs_o[:, None] < dout) & (offs_i[None, :] < din))


def ekfac_lambda_triton(At: torch.Tensor, Gt: torch.Tensor,
                        a_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[dout, din]`` float32 from contiguous ``At`` [N, T, din], ``Gt`` [N, T, dout] (one dtype:
    fp32, fp16 or bf16) and an optional contiguous ``a_mask`` [N, T]."""
    N, T, din = At.shape
    dout = Gt.shape[2]
    out = torch.zeros(dout, din, dtype=torch.float32, device=At.device)
    if N == 0 or T == 0:
        return out
    At, Gt = At.contiguous(), Gt.contiguous()
    mask = a_mask.contiguous().view(torch.uint8) if a_mask is not None else At

    def grid(meta):
        return grid_1d("ekfac_lambda", triton.cdiv(dout, meta["BO"]) * triton.cdiv(din, meta["BI"]))

    with device_guard(At):
        _ekfac_lambda_kernel[grid](At, Gt, mask, out, N, T, din, dout, pow2_bucket(T),
                                   HAS_MASK=a_mask is not None, PRECISION=input_precision(At.dtype),
                                   UPCAST=upcast_dot(At.dtype))
    return out
