"""``kron_project``: Kronecker (LoGra-style) projection of factored per-example gradients.

``Y[n] = P_outᵀ D_n P_in = Σ_t (P_outᵀ g_t)(P_inᵀ a_t)ᵀ ∈ R^{k_out × k_in}`` with
``D_n = G_nᵀ A_n``, without forming ``D_n``.

Two contraction orders, chosen per call by the FLOP cost model of :mod:`._dispatch`:

* ``"project"``: project every token first (``A_n P_in``, ``G_n P_out``), then one small GEMM
  per example — ``2·N·T·(din·k_in + dout·k_out + k_out·k_in)`` FLOPs; fused in the backend
  kernels (C++, Triton, CUDA);
* ``"materialize"``: ``D_n`` tile by tile of examples, then ``P_outᵀ D_n P_in`` —
  ``2·N·(T·dout·din + dout·din·k_in + dout·k_in·k_out)`` FLOPs (wins for long sequences of
  small layers).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _common as c
from . import _dispatch as d

OP = "kron_project"
CONTRACTIONS = ("project", "materialize")


# --------------------------------------------------------------------------- reference
def kron_project_reference(A, G, P_in, P_out, a_mask=None):
    """Straight from the formula, float64 for float64 inputs (the oracle), else float32."""
    dt = torch.float64 if A.dtype == torch.float64 else torch.float32
    N, T, din = A.shape
    k_in, k_out = P_in.shape[1], P_out.shape[1]
    out = torch.zeros(N, k_out, k_in, dtype=dt, device=A.device)
    if N == 0:
        return out
    nc = c.chunk(N, T * (k_in + k_out + din + G.shape[2]) * 8)
    for n0 in range(0, N, nc):
        a = A[n0:n0 + nc].to(dt) @ P_in.to(dt)       # [n, T, k_in]
        g = G[n0:n0 + nc].to(dt) @ P_out.to(dt)      # [n, T, k_out]
        if a_mask is not None:
            m = a_mask[n0:n0 + nc, :, None]
            a = torch.where(m, a, 0.0)
            g = torch.where(m, g, 0.0)
        out[n0:n0 + nc] = torch.einsum("nto,nti->noi", g, a)
    return out


# --------------------------------------------------------------------------- torch formulations
def project_torch(A, G, P_in, P_out, a_mask=None):
    N, T, din = A.shape
    k_in, k_out = P_in.shape[1], P_out.shape[1]
    out = torch.empty(N, k_out, k_in, dtype=torch.float32, device=A.device)
    if N == 0:
        return out
    dt = c.compute_dtype(A)
    A, G = c.mask_rows(A, a_mask), c.mask_rows(G, a_mask)
    Pi, Po = P_in.to(dt), P_out.to(dt)
    nc = c.chunk(N, T * (k_in + k_out) * 4 + k_in * k_out * 4)
    for n0 in range(0, N, nc):
        a = A[n0:n0 + nc].to(dt) @ Pi
        g = G[n0:n0 + nc].to(dt) @ Po
        out[n0:n0 + nc] = torch.bmm(g.transpose(1, 2), a).float()
    return out


def materialize_torch(A, G, P_in, P_out, a_mask=None):
    N, T, din = A.shape
    dout = G.shape[2]
    k_in, k_out = P_in.shape[1], P_out.shape[1]
    out = torch.empty(N, k_out, k_in, dtype=torch.float32, device=A.device)
    if N == 0:
        return out
    dt = c.compute_dtype(A)
    A, G = c.mask_rows(A, a_mask), c.mask_rows(G, a_mask)
    Pi, Po = P_in.to(dt), P_out.to(dt)
    nc = c.chunk(N, dout * din * 4)
    for n0 in range(0, N, nc):
        D = torch.bmm(G[n0:n0 + nc].to(dt).transpose(1, 2), A[n0:n0 + nc].to(dt))
        out[n0:n0 + nc] = (Po.T @ (D @ Pi)).float()
    return out


# --------------------------------------------------------------------------- fused kernels
def _cpp(A, G, P_in, P_out, a_mask):
    C = c.require_native(OP)
    N, T, din = A.shape
    dout = G.shape[2]
    k_in, k_out = P_in.shape[1], P_out.shape[1]
    A, G, P_in, P_out = (x.float().contiguous() for x in (A, G, P_in, P_out))
    am = c.contiguous(a_mask)
    out = torch.empty(N, k_out, k_in, dtype=torch.float32)
    if N:
        C.kron_project_cpu(A.data_ptr(), G.data_ptr(), P_in.data_ptr(), P_out.data_ptr(),
                           c.ptr(am), out.data_ptr(), N, T, din, dout, k_in, k_out)
    return out


def _cuda(A, G, P_in, P_out, a_mask):
    C = c.require_native(OP)
    N, T, din = A.shape
    dout = G.shape[2]
    k_in, k_out = P_in.shape[1], P_out.shape[1]
    A, G, P_in, P_out = (x.contiguous() for x in (A, G, P_in, P_out))
    am = c.contiguous(a_mask)
    out = torch.empty(N, k_out, k_in, dtype=torch.float32, device=A.device)
    if N:
        with torch.cuda.device(A.device):
            for n0 in range(0, N, 65535):  # the kernel's grid holds at most 65535 examples
                n1 = min(N, n0 + 65535)
                C.kron_project_cuda(A[n0:n1].data_ptr(), G[n0:n1].data_ptr(), P_in.data_ptr(),
                                    P_out.data_ptr(), 0 if am is None else am[n0:n1].data_ptr(),
                                    out[n0:n1].data_ptr(), n1 - n0, T, din, dout, k_in, k_out,
                                    c.CUDA_DTYPE_CODES[A.dtype], c.cuda_stream(A.device))
    return out


def _triton(A, G, P_in, P_out, a_mask):
    from ..triton.kron_project import kron_project_triton  # optional dependency

    return kron_project_triton(A, G, P_in, P_out, a_mask)


# implementation names of the dispatch table -> functions
_IMPL = {"reference": kron_project_reference, "materialize": materialize_torch,
         "torch": project_torch, "cpp": _cpp, "triton": _triton, "cuda": _cuda}


def _run(A, G, P_in, P_out, a_mask, backend: str, contraction: str) -> torch.Tensor:
    (N, T, din), (dout, k_out), k_in = A.shape, P_out.shape, P_in.shape[1]
    impl = d.implementation(OP, backend, contraction, A.device.type, A.dtype,
                            N=N, T=T, din=din, dout=dout, k_in=k_in, k_out=k_out)
    return _IMPL[impl](A, G, P_in, P_out, a_mask)


@torch.library.custom_op("fastinf::kron_project", mutates_args=())
def _kron_project_op(A: torch.Tensor, G: torch.Tensor, P_in: torch.Tensor, P_out: torch.Tensor,
                     a_mask: Optional[torch.Tensor], backend: str,
                     contraction: str) -> torch.Tensor:
    return _run(A, G, P_in, P_out, a_mask, backend, contraction)


@_kron_project_op.register_fake
def _(A, G, P_in, P_out, a_mask, backend, contraction):
    dt = torch.float64 if A.dtype == torch.float64 else torch.float32
    return A.new_empty((A.shape[0], P_out.shape[1], P_in.shape[1]), dtype=dt)


# --------------------------------------------------------------------------- public API
def validate(A, G, P_in, P_out, a_mask=None):
    """Checks the arguments of :func:`kron_project`; returns ``(N, T, din, dout, k_in, k_out)``."""
    c.check_tensor(OP, "A", A, ("N", "T", "din"))
    c.check_tensor(OP, "G", G, ("N", "T", "dout"))
    c.check_tensor(OP, "P_in", P_in, ("din", "k_in"))
    c.check_tensor(OP, "P_out", P_out, ("dout", "k_out"))
    c.check_same(OP, {"A": A, "G": G, "P_in": P_in, "P_out": P_out})
    N, T, din = A.shape
    c.check_dim(OP, "G", G, 0, N, "from A", ("N", "T", "dout"))
    c.check_dim(OP, "G", G, 1, T, "from A", ("N", "T", "dout"))
    dout = G.shape[2]
    c.check_dim(OP, "P_in", P_in, 0, din, "from A", ("din", "k_in"))
    c.check_dim(OP, "P_out", P_out, 0, dout, "from G", ("dout", "k_out"))
    c.check_mask(OP, "a_mask", a_mask, (N, T), "A", A.device)
    return N, T, din, dout, P_in.shape[1], P_out.shape[1]


def kron_project(A: torch.Tensor, G: torch.Tensor, P_in: torch.Tensor, P_out: torch.Tensor, *,
                 a_mask: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                 contraction: Optional[str] = None,
                 check_finite: Optional[bool] = None) -> torch.Tensor:
    """Kronecker projection of factored per-example gradients.

    ``Y[n] = Σ_t (P_outᵀ G[n,t]) (P_inᵀ A[n,t])ᵀ = P_outᵀ (G_nᵀ A_n) P_in``

    Args:
        A: ``[N, T, din]`` layer inputs; G: ``[N, T, dout]`` output gradients.
        P_in: ``[din, k_in]``; P_out: ``[dout, k_out]`` projection matrices.
        a_mask: ``[N, T]`` bool, False for tokens that contribute nothing (padding).
        backend: one of ``fastinf.ops.BACKENDS`` or None (see the package doc): ``"cpu"`` runs
            the C++ kernel where it measured faster and torch otherwise, ``"cpp"`` forces it.
        check_finite: raise ``ValueError`` naming the argument and example if the result is
            not finite; None (default) checks on CPU only, as a check on a GPU would
            synchronise every call (the capture there checks every loss and gradient).
        contraction: ``"project"``, ``"materialize"`` or None for the cost model's choice.

    Returns float32 ``[N, k_out, k_in]`` (float64 for float64 inputs).
    """
    validate(A, G, P_in, P_out, a_mask)
    contraction = c.check_contraction(OP, contraction, CONTRACTIONS)
    backend = c.resolve_backend(OP, backend, A.device, A.dtype)
    A, G, P_in, P_out = (x.detach() for x in (A, G, P_in, P_out))
    out = c.dispatch(_kron_project_op, _run, A, G, P_in, P_out, a_mask, backend, contraction)
    return c.check_result(OP, out, check_finite,
                          {"A": A, "G": G, "P_in": P_in[None], "P_out": P_out[None]},
                          {"A": a_mask, "G": a_mask})
