"""``ekfac_lambda``: the EK-FAC eigenvalue correction, summed over a batch.

``Λ_sum[o, i] = Σ_n ((G_n Q_S)ᵀ (A_n Q_A))[o, i]²`` — the squared per-example gradients in the
Kronecker eigenbasis, summed over the N examples (the caller divides by the total example count).

Two contraction orders, chosen per call by a FLOP cost model (:func:`plan`):

* ``"rotate"``: rotate the tokens first (``Ã = A Q_A``, ``G̃ = G Q_S`` by GEMM), then
  ``Σ_n (Σ_t g̃_t ã_tᵀ)^∘2`` fused in the backend kernels (per-thread output tiles, so no
  ``[N, dout, din]`` tensor exists) — ``2·N·T·(din² + dout² + dout·din)`` FLOPs;
* ``"materialize"``: ``D_n = G_nᵀ A_n`` tile by tile of examples, rotated by batched GEMMs
  (``Q_Sᵀ D_n Q_A``), squared and summed — ``2·N·dout·din·(T + din + dout)`` FLOPs; cheaper when
  T is large (convolutions with many patches).

Memory is bounded by the workspace (``FASTINF_WORKSPACE_MB``) beyond the rotated inputs.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _common as c
from .score_factored import _compute_dtype

OP = "ekfac_lambda"
CONTRACTIONS = ("rotate", "materialize")
# backend=None on CPU: the C++ kernel (rank-T update per example) wins for few tokens per example
# (3.4x over naive at T=1 vs 1.5x for torch), torch's bmm tiles beyond (bench/ops/ekfac_lambda.py).
CPU_FUSED_MAX_T = 4


def flops(N, T, din, dout) -> dict:
    """FLOPs of each contraction order."""
    return {
        "rotate": 2.0 * N * T * (din * din + dout * dout + dout * din),
        "materialize": 2.0 * N * dout * din * (T + din + dout),
    }


def plan(N, T, din, dout) -> str:
    """The cheaper contraction order by FLOPs (ties go to ``"rotate"``)."""
    f = flops(N, T, din, dout)
    return "rotate" if f["rotate"] <= f["materialize"] else "materialize"


# --------------------------------------------------------------------------- reference
def ekfac_lambda_reference(A, G, QA, QS, a_mask=None):
    """Pure-torch reference straight from the formula, chunked over examples.

    Computes in float64 for float64 inputs (the test oracle), else in float32.
    """
    dt = torch.float64 if A.dtype == torch.float64 else torch.float32
    N, T, din = A.shape
    dout = G.shape[2]
    out = torch.zeros(dout, din, dtype=dt, device=A.device)
    if N == 0:
        return out
    QA, QS = QA.to(dt), QS.to(dt)
    nc = c.chunk(N, 3 * dout * din * torch.finfo(dt).bits // 8)
    for n0 in range(0, N, nc):
        a = c.mask_rows(A[n0:n0 + nc].to(dt), None if a_mask is None else a_mask[n0:n0 + nc])
        g = c.mask_rows(G[n0:n0 + nc].to(dt), None if a_mask is None else a_mask[n0:n0 + nc])
        D = torch.einsum("nto,nti->noi", g, a)
        R = torch.einsum("op,noi,ij->npj", QS, D, QA)
        out += (R * R).sum(0)
    return out


# --------------------------------------------------------------------------- torch formulations
def rotate(A, G, QA, QS, a_mask=None):
    """``(A Q_A, G Q_S)`` in the compute dtype (float32 for half inputs), masked rows zeroed."""
    dt = _compute_dtype(A)
    A, G = c.mask_rows(A, a_mask), c.mask_rows(G, a_mask)
    return A.to(dt) @ QA.to(dt), G.to(dt) @ QS.to(dt)


def _sum_sq_tiles(At, Gt, out):
    """``out += Σ_n (Gt_nᵀ At_n)^∘2`` over tiles of examples (float32 accumulation)."""
    N, T, din = At.shape
    dout = Gt.shape[2]
    nc = c.chunk(N, 2 * dout * din * 4)
    for n0 in range(0, N, nc):
        R = torch.bmm(Gt[n0:n0 + nc].transpose(1, 2), At[n0:n0 + nc])
        out += (R * R).sum(0).float()
    return out


def rotate_torch(A, G, QA, QS, a_mask=None):
    N, T, din = A.shape
    dout = G.shape[2]
    out = torch.zeros(dout, din, dtype=torch.float32, device=A.device)
    if N == 0:
        return out
    At, Gt = rotate(A, G, QA, QS, a_mask)
    return _sum_sq_tiles(At, Gt, out)


def materialize_torch(A, G, QA, QS, a_mask=None):
    N, T, din = A.shape
    dout = G.shape[2]
    out = torch.zeros(dout, din, dtype=torch.float32, device=A.device)
    if N == 0:
        return out
    dt = _compute_dtype(A)
    A, G = c.mask_rows(A, a_mask), c.mask_rows(G, a_mask)
    QA, QS = QA.to(dt), QS.to(dt)
    nc = c.chunk(N, 3 * dout * din * 4)
    for n0 in range(0, N, nc):
        D = torch.bmm(G[n0:n0 + nc].to(dt).transpose(1, 2), A[n0:n0 + nc].to(dt))
        R = torch.matmul(QS.T, torch.matmul(D, QA))
        out += (R * R).sum(0).float()
    return out


# --------------------------------------------------------------------------- fused kernels
def _fused_cpu(A, G, QA, QS, a_mask):
    C = c.require_native(OP)
    N, T, din = A.shape
    dout = G.shape[2]
    out = torch.zeros(dout, din, dtype=torch.float32)
    if N == 0:
        return out
    # Rotation by GEMM: masked rows may hold garbage, the kernel skips them via the mask.
    At = (A.float() @ QA.float()).contiguous()
    Gt = (G.float() @ QS.float()).contiguous()
    am = c.contiguous(a_mask)
    C.ekfac_lambda_cpu(At.data_ptr(), Gt.data_ptr(), c.ptr(am), out.data_ptr(), N, T, din, dout)
    return out


def _fused_cuda(A, G, QA, QS, a_mask):
    C = c.require_native(OP)
    N, T, din = A.shape
    dout = G.shape[2]
    out = torch.zeros(dout, din, dtype=torch.float32, device=A.device)
    if N == 0:
        return out
    At = (A.float() @ QA.float()).contiguous()
    Gt = (G.float() @ QS.float()).contiguous()
    am = c.contiguous(a_mask)
    with torch.cuda.device(A.device):
        C.ekfac_lambda_cuda(At.data_ptr(), Gt.data_ptr(), c.ptr(am), out.data_ptr(), N, T, din,
                            dout, c.CUDA_DTYPE_CODES[At.dtype], c.cuda_stream(A.device))
    return out


def _fused_triton(A, G, QA, QS, a_mask):
    from ..triton.ekfac_lambda import ekfac_lambda_triton

    N, T, din = A.shape
    dout = G.shape[2]
    if N == 0:
        return torch.zeros(dout, din, dtype=torch.float32, device=A.device)
    At = (A.float() @ QA.float()).contiguous()
    Gt = (G.float() @ QS.float()).contiguous()
    return ekfac_lambda_triton(At, Gt, c.contiguous(a_mask))


_FUSED = {"cpu": _fused_cpu, "cuda": _fused_cuda, "triton": _fused_triton, "torch": rotate_torch}


def _run(A, G, QA, QS, a_mask, backend: str, contraction: str) -> torch.Tensor:
    if backend == "reference":
        return ekfac_lambda_reference(A, G, QA, QS, a_mask)
    N, T, din = A.shape
    dout = G.shape[2]
    if contraction == "auto":
        contraction = plan(N, T, din, dout)
    if contraction == "materialize":
        return materialize_torch(A, G, QA, QS, a_mask)
    return _FUSED[backend](A, G, QA, QS, a_mask)


@torch.library.custom_op("fastinf::ekfac_lambda", mutates_args=())
def _ekfac_lambda_op(A: torch.Tensor, G: torch.Tensor, QA: torch.Tensor, QS: torch.Tensor,
                     a_mask: Optional[torch.Tensor], backend: str,
                     contraction: str) -> torch.Tensor:
    return _run(A, G, QA, QS, a_mask, backend, contraction)


@_ekfac_lambda_op.register_fake
def _(A, G, QA, QS, a_mask, backend, contraction):
    dt = torch.float64 if A.dtype == torch.float64 else torch.float32
    return A.new_empty((G.shape[2], A.shape[2]), dtype=dt)


# --------------------------------------------------------------------------- public API
def validate(A, G, QA, QS, a_mask=None):
    """Checks the arguments of :func:`ekfac_lambda`; returns ``(N, T, din, dout)``."""
    c.check_tensor(OP, "A", A, ("N", "T", "din"))
    c.check_tensor(OP, "G", G, ("N", "T", "dout"))
    c.check_tensor(OP, "QA", QA, ("din", "din"))
    c.check_tensor(OP, "QS", QS, ("dout", "dout"))
    c.check_same(OP, {"A": A, "G": G})
    for name, q in (("QA", QA), ("QS", QS)):
        if q.device != A.device:
            raise ValueError(f"{OP}: arguments 'A' and '{name}' are on different devices "
                             f"({A.device} and {q.device})")
    N, T, din = A.shape
    c.check_dim(OP, "G", G, 0, N, "from A", ("N", "T", "dout"))
    c.check_dim(OP, "G", G, 1, T, "from A", ("N", "T", "dout"))
    dout = G.shape[2]
    c.check_dim(OP, "QA", QA, 0, din, "from A", ("din", "din"))
    c.check_dim(OP, "QA", QA, 1, din, "from A", ("din", "din"))
    c.check_dim(OP, "QS", QS, 0, dout, "from G", ("dout", "dout"))
    c.check_dim(OP, "QS", QS, 1, dout, "from G", ("dout", "dout"))
    c.check_mask(OP, "a_mask", a_mask, (N, T), "A", A.device)
    return N, T, din, dout


def ekfac_lambda(A: torch.Tensor, G: torch.Tensor, QA: torch.Tensor, QS: torch.Tensor, *,
                 a_mask: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                 contraction: Optional[str] = None, check_finite: bool = True) -> torch.Tensor:
    """EK-FAC eigenvalue correction of a batch, summed over its examples.

    ``Λ_sum = Σ_n ((G_n Q_S)ᵀ (A_n Q_A))^∘2``

    Args:
        A: ``[N, T, din]`` layer inputs of N examples (T tokens each).
        G: ``[N, T, dout]`` output gradients of the same examples.
        QA: ``[din, din]`` eigenvectors of the input covariance (columns).
        QS: ``[dout, dout]`` eigenvectors of the gradient covariance (columns).
        a_mask: ``[N, T]`` bool, False for tokens that contribute nothing (padding).
        backend: ``"reference"``, ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or None for
            the fastest usable for the inputs' device.
        contraction: ``"rotate"``, ``"materialize"`` or None to let the cost model choose.
        check_finite: raise ``ValueError`` naming the argument and example if the result is not
            finite because an input holds NaN/Inf (skipped under ``torch.compile``).

    Inputs are float32, float16 or bfloat16 (float64 with ``backend="reference"``); QA/QS may be
    of any float dtype. The result is float32 ``[dout, din]`` (float64 for float64 inputs).
    """
    N, T, din, dout = validate(A, G, QA, QS, a_mask)
    if contraction not in (None,) + CONTRACTIONS:
        raise ValueError(f"{OP}: unknown contraction {contraction!r}; expected one of "
                         f"{', '.join(CONTRACTIONS)} or None")
    pref = c.default_preference(A.device)
    if backend is None and A.device.type == "cpu" and T > CPU_FUSED_MAX_T:
        pref = ("torch",)  # bmm tiles beat the C++ rank-T accumulation beyond a few tokens
    backend = c.resolve_backend(OP, backend, A.device, A.dtype, pref)
    A, G, QA, QS = (x.detach() for x in (A, G, QA, QS))
    out = c.dispatch(_ekfac_lambda_op, _run, A, G, QA, QS, a_mask, backend,
                     contraction or "auto")
    if check_finite and c.has_nonfinite(out):
        c.find_nonfinite(OP, {"A": A, "G": G}, {"A": a_mask, "G": a_mask})
        raise ValueError(f"{OP}: the result overflowed (inputs are finite but squares exceed "
                         f"the float32 range); rescale the inputs")
    return out
