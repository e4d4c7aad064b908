"""Triton kernel of ``jl_project``: ``Y = X Φᵀ`` with Φ tiles generated in registers.

The hash is the one documented in :mod:`fastinf.ops.jl_project` (all arithmetic in uint32,
wrapping), so the tiles equal those of the torch, C++ and CUDA paths bit for bit; the normal
entries use the correctly rounded ``sqrt_rn`` (``tl.sqrt`` is ``sqrt.approx`` on NVIDIA) and
libdevice's ``logf``/``cosf``, as CUDA's ``sqrtf``/``logf``/``cosf`` without fast math.
``key`` is never specialised (Triton turns an int argument equal to 1 into a constant).
The grid is 1-D (output tiles in grouped order), so k is not bounded by grid axis 1 (65535).
Dots: Rademacher tiles (±1, exact in any dtype) meet X in X's dtype (tensor cores for
fp16/bf16); normal tiles stay fp32 (never rounded) and X is upcast. fp32 dots follow torch's
float32 matmul precision (:mod:`fastinf.triton._common`).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import configs, device_guard, grid_1d, input_precision, tile_ids, upcast_dot

# ptxas -v (sm_90a, triton 3.6, bf16, normal kind, the register-heaviest): 168, 196, 252
# registers, no spills; [128, 64, 32] x 8 warps spilled 16 B and [16, 128, 64] x 4 warps 652 B.
_CONFIGS = configs(triton.Config({"BN": 16, "BK": 32, "BP": 32}, num_warps=4), [
    triton.Config({"BN": 64, "BK": 64, "BP": 32}, num_warps=4, num_stages=3),
    triton.Config({"BN": 64, "BK": 128, "BP": 32}, num_warps=8, num_stages=3),
    triton.Config({"BN": 32, "BK": 64, "BP": 64}, num_warps=4, num_stages=3),
    triton.Config({"BN": 32, "BK": 128, "BP": 32}, num_warps=8, num_stages=3),
])


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * tl.full((), 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full((), 0xC2B2AE35, tl.uint32)
    h = h ^ (h >> 16)
    return h


@triton.jit
def phi_tile(row, ri, KIND: tl.constexpr):
    """Unscaled ``Φ[rows, ri]`` as fp32 ``[BK, BP]`` (row: the rows' keys, ri: column indices)."""
    h = _fmix32((ri.to(tl.uint32) * tl.full((), 0x85EBCA77, tl.uint32))[None, :] ^ row[:, None])
    if KIND == 0:
        phi = tl.where((h >> 31) != 0, -1.0, 1.0)
    else:
        u1 = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        h2 = _fmix32(h ^ tl.full((), 0x27D4EB2F, tl.uint32))
        u2 = (h2 >> 8).to(tl.float32) * (1.0 / 16777216.0)
        phi = tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
    return phi.to(tl.float32)


@triton.autotune(configs=_CONFIGS, key=["K_KEY", "P_KEY"])
@triton.jit(do_not_specialize=["key"])
def _jl_kernel(X, Y, N, p, k, key, scale, K_KEY, P_KEY,
               KIND: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, GROUP: tl.constexpr = 8):
    pid_n, pid_k = tile_ids(tl.program_id(0), tl.cdiv(N, BN), tl.cdiv(k, BK), GROUP)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = pid_k * BK + tl.arange(0, BK)
    row = _fmix32(rk.to(tl.uint32) * tl.full((), 0x9E3779B1, tl.uint32) + key.to(tl.uint32))
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for i0 in range(0, p, BP):
        ri = (i0 + tl.arange(0, BP)).to(tl.int64)
        xm = (rn[:, None] < N) & (ri[None, :] < p)
        x = tl.load(X + rn[:, None] * p + ri[None, :], mask=xm, other=0.0)
        phi = tl.where(ri[None, :] < p, phi_tile(row, ri, KIND), 0.0)
        if KIND == 0 and not UPCAST:
            acc = tl.dot(x, tl.trans(phi.to(x.dtype)), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x.to(tl.float32), tl.trans(phi), acc, input_precision=PRECISION)
    ym = (rn[:, None] < N) & (rk[None, :] < k)
    tl.store(Y + rn[:, None] * k + rk[None, :], acc * scale, mask=ym)


def jl_project_triton(X: torch.Tensor, k: int, key: int, kind: int) -> torch.Tensor:
    """``X`` [N, p] (f32/f16/bf16) -> float32 [N, k]; ``key`` is the uint32 seed key, ``kind``
    0 (Rademacher) or 1 (normal)."""
    N, p = X.shape
    X = X.contiguous()
    out = torch.zeros(N, k, dtype=torch.float32, device=X.device)
    if N == 0 or k == 0 or p == 0:
        return out
    # dots in X's dtype for Rademacher, else fp32 (normal entries are never rounded)
    prec = input_precision(X.dtype if kind == 0 else torch.float32)

    def grid(meta):
        return grid_1d("jl_project", triton.cdiv(N, meta["BN"]) * triton.cdiv(k, meta["BK"]))

    with device_guard(X):
        _jl_kernel[grid](X, out, N, p, k, key, 1.0 / math.sqrt(k),
                         triton.next_power_of_2(k), triton.next_power_of_2(p),
                         KIND=kind, PRECISION=prec, UPCAST=upcast_dot(X.dtype))
    return out
