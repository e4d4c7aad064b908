"""Triton kernel of ``jl_project``: ``Y = X Φᵀ`` with Φ tiles generated in registers.

The hash is the one documented in :mod:`fastinf.ops.jl_project` (all arithmetic in uint32,
wrapping), so the tiles equal those of the torch, C++ and CUDA paths bit for bit.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl



@triton.jit
def _u32(x):
    return x.to(tl.uint32)


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * tl.full((), 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full((), 0xC2B2AE35, tl.uint32)
    h = h ^ (h >> 16)
    return h


@triton.jit
def _jl_kernel(X, Y, N, p, k, key, scale,
               KIND: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = pid_k * BK + tl.arange(0, BK)
    keyu = key.to(tl.uint32)
    row = _fmix32(rk.to(tl.uint32) * tl.full((), 0x9E3779B1, tl.uint32) + keyu)  # [BK]
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for i0 in range(0, p, BP):
        ri = (i0 + tl.arange(0, BP)).to(tl.int64)
        xm = (rn[:, None] < N) & (ri[None, :] < p)
        x = tl.load(X + rn[:, None] * p + ri[None, :], mask=xm, other=0.0).to(tl.float32)
        hc = ri.to(tl.uint32) * tl.full((), 0x85EBCA77, tl.uint32)
        h = _fmix32(hc[None, :] ^ row[:, None])  # [BK, BP]
        if KIND == 0:
            phi = tl.where((h >> 31) != 0, -1.0, 1.0)
        else:
            u1 = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            h2 = _fmix32(h ^ tl.full((), 0x27D4EB2F, tl.uint32))
            u2 = (h2 >> 8).to(tl.float32) * (1.0 / 16777216.0)
            phi = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
        phi = tl.where(ri[None, :] < p, phi, 0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(phi), input_precision="ieee")
    ym = (rn[:, None] < N) & (rk[None, :] < k)
    tl.store(Y + rn[:, None] * k + rk[None, :], acc * scale, mask=ym)


def jl_project_triton(X: torch.Tensor, k: int, key: int, kind: int) -> torch.Tensor:
    """``X`` [N, p] (f32/f16/bf16) -> float32 [N, k]; ``key`` is the uint32 seed key."""
    N, p = X.shape
    X = X.contiguous()
    out = torch.zeros(N, k, dtype=torch.float32, device=X.device)
    if N == 0 or k == 0 or p == 0:
        return out
    BN = 16 if N <= 16 else 32
    BK, BP = 32, 32
    grid = (triton.cdiv(N, BN), triton.cdiv(k, BK))
    _jl_kernel[grid](X, out, N, p, k, key, 1.0 / math.sqrt(k), KIND=kind, BN=BN, BK=BK, BP=BP)
    return out
