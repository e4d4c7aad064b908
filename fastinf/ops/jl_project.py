"""``jl_project``: dense Johnson–Lindenstrauss projection with Φ generated on the fly.

``Y = X Φᵀ`` with ``X [N, p]``, ``Φ [k, p]``, ``Φ[j, i] = r(seed, j, i) / √k`` where ``r`` is a
Rademacher (±1) or standard-normal variate computed from a counter-based integer hash of
``(seed, j, i)``; so ``E‖Φx‖² = ‖x‖²`` and the same seed gives the same Φ on every backend and
device. Φ is never stored whole: every backend generates it tile by tile next to the GEMM.

The hash (identical, bit for bit, in torch, C++, Triton and CUDA; all arithmetic mod 2³²)::

    fmix32(h):  h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
    key      = seed_key(seed)                       (Python, once: any int seed -> uint32)
    row(j)   = fmix32(j * 0x9E3779B1 + key)
    h(j, i)  = fmix32((i * 0x85EBCA77) ^ row(j))
    rademacher: +1 if the top bit of h is 0 else -1
    normal:     u1 = ((h >> 8) + 0.5) / 2²⁴,  h2 = fmix32(h ^ 0x27D4EB2F),
                u2 = (h2 >> 8) / 2²⁴,  z = √(-2 ln u1) · cos(2π u2)      (Box–Muller)

Column indices must be < 2³² (p ≤ 4 294 967 295).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _common as c
from . import _dispatch as d

OP = "jl_project"
KINDS = ("rademacher", "normal")
KIND_CODES = {"rademacher": 0, "normal": 1}

M32 = 0xFFFFFFFF
C_FMIX1, C_FMIX2 = 0x85EBCA6B, 0xC2B2AE35
C_ROW, C_COL, C_U2 = 0x9E3779B1, 0x85EBCA77, 0x27D4EB2F


# --------------------------------------------------------------------------- the hash
def _fmix32_int(h: int) -> int:
    h &= M32
    h ^= h >> 16
    h = (h * C_FMIX1) & M32
    h ^= h >> 13
    h = (h * C_FMIX2) & M32
    h ^= h >> 16
    return h


def seed_key(seed: int) -> int:
    """The uint32 key of an integer seed (any Python int, negative ones included)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{OP}: seed must be an int, got {type(seed).__name__}")
    s = seed & 0xFFFFFFFFFFFFFFFF
    return _fmix32_int(_fmix32_int(s & M32) ^ ((s >> 32) + 0x6A09E667)) & M32


def _mul32(h: torch.Tensor, const: int) -> torch.Tensor:
    """``(h * const) mod 2³²`` for int64 ``h`` in [0, 2³²) without signed overflow."""
    lo, hi = h & 0xFFFF, h >> 16
    return (lo * const + (((hi * (const & 0xFFFF)) & 0xFFFF) << 16)) & M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, C_FMIX1)
    h = h ^ (h >> 13)
    h = _mul32(h, C_FMIX2)
    return h ^ (h >> 16)


def phi_block(key: int, j0: int, j1: int, i0: int, i1: int, kind: str, *,
              dtype=torch.float32, device=None, scale: Optional[float] = None) -> torch.Tensor:
    """``Φ[j0:j1, i0:i1]`` (unscaled ±1 / N(0,1) entries times ``scale``) as a dense block."""
    dev = torch.device("cpu") if device is None else device
    j = torch.arange(j0, j1, dtype=torch.int64, device=dev)
    i = torch.arange(i0, i1, dtype=torch.int64, device=dev)
    row = _fmix32((_mul32(j, C_ROW) + key) & M32)
    h = _fmix32(_mul32(i, C_COL)[None, :] ^ row[:, None])
    if kind == "rademacher":
        out = 1.0 - 2.0 * (h >> 31).to(torch.float64 if dtype == torch.float64 else torch.float32)
    else:
        wd = torch.float64
        u1 = ((h >> 8).to(wd) + 0.5) * (1.0 / 16777216.0)
        u2 = (_fmix32(h ^ C_U2) >> 8).to(wd) * (1.0 / 16777216.0)
        out = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    if scale is not None:
        out = out * scale
    return out.to(dtype)


# --------------------------------------------------------------------------- tiling
def block_cols(k: int, itemsize: int = 4, budget: Optional[int] = None) -> int:
    """Columns of Φ generated at once by the torch paths: a ``[k, cols]`` block within budget.

    The block also holds the int64 hash intermediates (~4 of them), hence the factor.
    """
    budget = c.workspace_bytes() // 4 if budget is None else budget
    per_col = max(k, 1) * (itemsize + 4 * 8)
    return max(64, int(budget // per_col))


# --------------------------------------------------------------------------- reference / torch
def _project_blocks(X, k, key, kind, dt):
    N, p = X.shape
    out = torch.zeros(N, k, dtype=dt, device=X.device)
    if N == 0 or k == 0 or p == 0:
        return out
    scale = 1.0 / math.sqrt(k)
    bc = block_cols(k, torch.finfo(dt).bits // 8)
    for i0 in range(0, p, bc):
        i1 = min(p, i0 + bc)
        ph = phi_block(key, 0, k, i0, i1, kind, dtype=dt, device=X.device)
        out += X[:, i0:i1].to(dt) @ ph.T
    return out * scale


def jl_project_reference(X, k, seed=0, kind="rademacher"):
    """Reference: Φ in column blocks, float64 for float64 inputs (the test oracle), else float32."""
    return _blocks(X, k, seed_key(seed), kind)


# --------------------------------------------------------------------------- compiled kernels
def _cpp(X, k, key, kind):
    C = c.require_native(OP)
    N, p = X.shape
    X = X.float().contiguous()
    out = torch.zeros(N, k, dtype=torch.float32)
    if N and k and p:
        C.jl_project_cpu(X.data_ptr(), out.data_ptr(), N, p, k, key, KIND_CODES[kind])
    return out


def _cuda(X, k, key, kind):
    C = c.require_native(OP)
    N, p = X.shape
    X = X.contiguous()
    out = torch.zeros(N, k, dtype=torch.float32, device=X.device)
    if N and k and p:
        with torch.cuda.device(X.device):
            C.jl_project_cuda(X.data_ptr(), out.data_ptr(), N, p, k, key, KIND_CODES[kind],
                              c.CUDA_DTYPE_CODES[X.dtype], c.cuda_stream(X.device))
    return out


def _triton(X, k, key, kind):
    from ..triton.jl_project import jl_project_triton  # optional dependency

    return jl_project_triton(X, k, key, KIND_CODES[kind])


def _blocks(X, k, key, kind):
    """The reference and torch path: Φ in column blocks, float64 for float64 inputs (the test
    oracle), else float32 GEMMs on X's device."""
    dt = torch.float64 if X.dtype == torch.float64 else torch.float32
    return _project_blocks(X, k, key, kind, dt)


# implementation names of the dispatch table -> functions
_IMPL = {"reference": _blocks, "torch": _blocks, "cpp": _cpp, "triton": _triton, "cuda": _cuda}


def _run(X, k, key, kind, backend):
    impl = d.implementation(OP, backend, "auto", X.device.type, X.dtype,
                            N=X.shape[0], p=X.shape[1], k=k)
    return _IMPL[impl](X, k, key, kind)


@torch.library.custom_op("fastinf::jl_project", mutates_args=())
def _jl_project_op(X: torch.Tensor, k: int, key: int, kind: str, backend: str) -> torch.Tensor:
    return _run(X, k, key, kind, backend)


@_jl_project_op.register_fake
def _(X, k, key, kind, backend):
    dt = torch.float64 if X.dtype == torch.float64 else torch.float32
    return X.new_empty((X.shape[0], k), dtype=dt)


# --------------------------------------------------------------------------- public API
def validate(X, k, seed, kind):
    c.check_tensor(OP, "X", X, ("N", "p"))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{OP}: k must be a positive int, got {k!r}")
    if kind not in KINDS:
        raise ValueError(f"{OP}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    seed_key(seed)
    if X.shape[1] > M32:
        raise ValueError(f"{OP}: argument 'X' has shape {c._fmt(X.shape)}; p must be < 2^32")
    return X.shape


def jl_project(X: torch.Tensor, k: int, *, seed: int = 0, kind: str = "rademacher",
               backend: Optional[str] = None, check_finite: Optional[bool] = None) -> torch.Tensor:
    """Dense JL projection ``Y = X Φᵀ`` with Φ ``[k, p]`` generated on the fly.

    ``Φ[j, i] = r(seed, j, i) / √k``, ``r`` Rademacher (±1) or N(0, 1) from a counter-based hash
    (see the module doc), identical on every backend; ``E‖Φx‖² = ‖x‖²``.

    Args:
        X: ``[N, p]`` rows to project (float32/float16/bfloat16; float64 with ``"reference"``).
        k: output dimension.
        seed: any int; the same seed gives the same Φ everywhere.
        kind: ``"rademacher"`` or ``"normal"``.
        backend: one of ``fastinf.ops.BACKENDS`` or None (see the package doc): ``"cpu"`` runs
            the C++ kernel where it measured faster and torch otherwise, ``"cpp"`` forces it.
        check_finite: raise ``ValueError`` naming the argument and example if the result is
            not finite; None (default) checks on CPU only, as a check on a GPU would
            synchronise every call (the capture there checks every loss and gradient).

    Returns float32 ``[N, k]`` (float64 for float64 inputs). Memory: never a Φ-sized buffer.
    """
    validate(X, k, seed, kind)
    backend = c.resolve_backend(OP, backend, X.device, X.dtype)
    X = X.detach()
    out = c.dispatch(_jl_project_op, _run, X, k, seed_key(seed), kind, backend)
    return c.check_result(OP, out, check_finite, {"X": X})
