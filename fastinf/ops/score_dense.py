"""``score_dense``: scores of factored per-example gradients against dense query matrices.

``S[n, q] = Σ_t G[n,t]ᵀ M[q] A[n,t] = ⟨G_nᵀ A_n, M_q⟩_F`` — used for EK-FAC full-rank queries,
where ``M_q = H⁻¹ D_q`` is the preconditioned query gradient.

Two contraction orders, chosen per call by the FLOP cost model of :mod:`._dispatch`:

* ``"token"``: ``M_q a_t`` for every token, dotted with ``g_t`` — ``2·N·T·Q·dout·din`` FLOPs; fused
  in the backend kernels (GEMM with a dot-product epilogue), so ``[N, T, Q, dout]`` never exists;
* ``"materialize"``: ``D_n = G_nᵀ A_n`` in chunks of its rows, each contracted by GEMM with the
  same rows of the flattened ``M`` — ``2·dout·din·(N·T + N·Q)`` FLOPs.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _common as c
from . import _dispatch as d

OP = "score_dense"
CONTRACTIONS = ("token", "materialize")


# --------------------------------------------------------------------------- reference
def score_dense_reference(A, G, M, a_mask=None):
    """Pure-torch reference, straight from the formula, chunked over examples and queries.

    Computes in float64 for float64 inputs (the test oracle), else in float32.
    """
    dt = torch.float64 if A.dtype == torch.float64 else torch.float32
    N, T, din = A.shape
    Q, dout, _ = M.shape
    out = torch.zeros(N, Q, dtype=dt, device=A.device)
    if N == 0 or Q == 0:
        return out
    per = 2 * T * dout * torch.finfo(dt).bits // 8
    qc = c.chunk(Q, per)
    nc = c.chunk(N, per * qc)
    for q0 in range(0, Q, qc):
        Mq = M[q0:q0 + qc].to(dt)
        for n0 in range(0, N, nc):
            y = torch.einsum("qed,ntd->ntqe", Mq, A[n0:n0 + nc].to(dt))
            s = torch.einsum("ntqe,nte->ntq", y, G[n0:n0 + nc].to(dt))
            if a_mask is not None:
                s = torch.where(a_mask[n0:n0 + nc, :, None], s, 0.0)
            out[n0:n0 + nc, q0:q0 + qc] = s.sum(dim=1)
    return out


# --------------------------------------------------------------------------- torch formulations
# Bytes of a chunk of D (all examples of the call, some rows) on the CPU: 128 train examples
# against 256 queries of a 688 x 256 layer (T = 48, 2 threads) took 161-165 ms per 256 examples
# in 2-22 MiB chunks, 193 ms in 43 MiB and 224 ms in 86 MiB (the whole D); 32 examples, 240 ms
# at any chunk size (the GEMM reads all of M per call: memory-bound).
D_TILE = 16 * 2**20


def materialize_torch(A, G, M, a_mask=None):
    """Per-example gradients, then a GEMM with the flattened M, in chunks of the rows of the
    gradients: ``out += D[:, e0:e1, :] · M[:, e0:e1, :]ᵀ``. Output float32 [N, Q].

    Each chunk holds all examples (tiles of examples only beyond the workspace), so ``D`` is
    built and ``M`` read once, as in the one-shot torch version; tiles of whole ``D_n`` read all
    of M once per tile (1.6x the one-shot time on the H200 at 1024x128x64x1024x1024). Off the
    CPU the GEMMs run in the inputs' dtype (fp32 accumulation, each chunk's partial score
    rounded to bf16 once and summed in fp32), as ``torch.einsum`` on them does.
    """
    N, T, din = A.shape
    Q, dout, _ = M.shape
    out = torch.zeros(N, Q, dtype=torch.float32, device=A.device)
    if N == 0 or Q == 0:
        return out
    dt = c.compute_dtype(A)
    A, G, M = c.mask_rows(A, a_mask), c.mask_rows(G, a_mask), M.to(dt)
    row = din * dt.itemsize                   # one row of one D_n
    nc = c.chunk(N, row)
    # rows per chunk, then evened out: on the CPU a chunk of D stays in cache between the bmm
    # that writes it and the GEMM that reads it (D_TILE); elsewhere the workspace
    ws = min(c.workspace_bytes(), D_TILE) if A.device.type == "cpu" else c.workspace_bytes()
    ec = max(1, ws // (nc * row))
    ec = -(-dout // -(-dout // ec))
    for n0 in range(0, N, nc):
        An = A[n0:n0 + nc].to(dt)
        for e0 in range(0, dout, ec):
            Gk = G[n0:n0 + nc, :, e0:e0 + ec].to(dt).transpose(1, 2)
            Dk = torch.bmm(Gk, An, out=c.scratch("score_dense.D", (Gk.shape[0], Gk.shape[1], din),
                                                 dt, A.device))
            out[n0:n0 + nc] += Dk.flatten(1) @ M[:, e0:e0 + ec].flatten(1).T
    return out


# token rows (examples x tokens) a tile of token_torch aims at: its GEMM is [rows, din] x
# [din, queries x dout], and GPU GEMMs reach peak only with a few thousand rows. Tiles of all
# queries and 64 examples ran at 25% of the H200's bf16 peak, 3.3x the one-shot einsum
# (8192x1x256x2048x2048, bench/results/ops.csv, 2026-11-27).
TOKEN_ROWS = 2048


def token_torch(A, G, M, a_mask=None):
    """``M_q a_t`` by GEMM on tiles, then the dot with ``g_t``. Output float32 [N, Q].

    Off the CPU both products run in the inputs' dtype with fp32 accumulation, as
    ``torch.einsum`` does (the ``[tile, T, Q, dout]`` products are rounded to bf16 either way;
    the fused Triton/CUDA kernels keep them in fp32). Tiles: at least ``TOKEN_ROWS`` token rows
    where the workspace allows, then as many queries as fit, then more examples.
    """
    N, T, din = A.shape
    Q, dout, _ = M.shape
    out = torch.empty(N, Q, dtype=torch.float32, device=A.device)
    if N == 0 or Q == 0:
        return out
    dt = c.compute_dtype(A)
    A = c.mask_rows(A, a_mask)
    G = c.mask_rows(G, a_mask)
    # one (example, query) pair of the product tile, twice for T > 1 (einsum's permuted copy)
    per = (1 if T == 1 else 2) * T * dout * dt.itemsize
    nc = min(N, -(-TOKEN_ROWS // T), max(1, c.workspace_bytes() // per))
    qc = c.chunk(Q, per * nc)
    if qc == Q:                           # all queries fit: as many examples as fit with them
        nc = c.chunk(N, per * Q, minimum=nc)
    for q0 in range(0, Q, qc):
        q1 = min(Q, q0 + qc)
        Mq = M[q0:q1].to(dt).reshape(-1, din)
        for n0 in range(0, N, nc):
            n1 = min(N, n0 + nc)
            y = (A[n0:n1].to(dt).reshape(-1, din) @ Mq.T).view(n1 - n0, T, q1 - q0, dout)
            out[n0:n1, q0:q1] = torch.einsum("ntqe,nte->nq", y, G[n0:n1].to(dt))
    return out


# --------------------------------------------------------------------------- fused kernels
def _cpp(A, G, M, a_mask):
    C = c.require_native(OP)
    N, T, din = A.shape
    Q, dout, _ = M.shape
    A, G, M = (x.float().contiguous() for x in (A, G, M))
    am = c.contiguous(a_mask)
    out = torch.empty(N, Q, dtype=torch.float32)
    if N and Q:
        C.score_dense_cpu(A.data_ptr(), G.data_ptr(), M.data_ptr(), c.ptr(am), out.data_ptr(),
                          N, T, Q, din, dout)
    return out


def _cuda(A, G, M, a_mask):
    C = c.require_native(OP)
    N, T, din = A.shape
    Q, dout, _ = M.shape
    A, G, M = (x.contiguous() for x in (A, G, M))
    am = c.contiguous(a_mask)
    out = torch.empty(N, Q, dtype=torch.float32, device=A.device)
    if N and Q:
        with torch.cuda.device(A.device):
            C.score_dense_cuda(A.data_ptr(), G.data_ptr(), M.data_ptr(), c.ptr(am),
                               out.data_ptr(), N, T, Q, din, dout, c.CUDA_DTYPE_CODES[A.dtype],
                               c.cuda_stream(A.device))
    return out


def _triton(A, G, M, a_mask):
    from ..triton.score_dense import score_dense_triton  # optional dependency

    return score_dense_triton(A, G, M, a_mask)


# implementation names of the dispatch table -> functions
_IMPL = {"reference": score_dense_reference, "materialize": materialize_torch,
         "torch": token_torch, "cpp": _cpp, "triton": _triton, "cuda": _cuda}


def _run(A, G, M, a_mask, backend: str, contraction: str) -> torch.Tensor:
    (N, T, din), (Q, dout) = A.shape, M.shape[:2]
    impl = d.implementation(OP, backend, contraction, A.device.type, A.dtype,
                            N=N, T=T, Q=Q, din=din, dout=dout)
    return _IMPL[impl](A, G, M, a_mask)


@torch.library.custom_op("fastinf::score_dense", mutates_args=())
def _score_dense_op(A: torch.Tensor, G: torch.Tensor, M: torch.Tensor,
                    a_mask: Optional[torch.Tensor], backend: str,
                    contraction: str) -> torch.Tensor:
    return _run(A, G, M, a_mask, backend, contraction)


@_score_dense_op.register_fake
def _(A, G, M, a_mask, backend, contraction):
    dt = torch.float64 if A.dtype == torch.float64 else torch.float32
    return A.new_empty((A.shape[0], M.shape[0]), dtype=dt)


# --------------------------------------------------------------------------- public API
def validate(A, G, M, a_mask=None):
    """Checks the arguments of :func:`score_dense`; returns ``(N, T, Q, din, dout)``."""
    c.check_tensor(OP, "A", A, ("N", "T", "din"))
    c.check_tensor(OP, "G", G, ("N", "T", "dout"))
    c.check_tensor(OP, "M", M, ("Q", "dout", "din"))
    c.check_same(OP, {"A": A, "G": G, "M": M})
    N, T, din = A.shape
    c.check_dim(OP, "G", G, 0, N, "from A", ("N", "T", "dout"))
    c.check_dim(OP, "G", G, 1, T, "from A", ("N", "T", "dout"))
    dout = G.shape[2]
    c.check_dim(OP, "M", M, 1, dout, "from G", ("Q", "dout", "din"))
    c.check_dim(OP, "M", M, 2, din, "from A", ("Q", "dout", "din"))
    c.check_mask(OP, "a_mask", a_mask, (N, T), "A", A.device)
    return N, T, M.shape[0], din, dout


def score_dense(A: torch.Tensor, G: torch.Tensor, M: torch.Tensor, *,
                a_mask: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                contraction: Optional[str] = None,
                check_finite: Optional[bool] = None) -> torch.Tensor:
    """Scores of factored per-example gradients against dense query matrices.

    ``S[n, q] = Σ_t G[n,t]ᵀ M[q] A[n,t] = ⟨G_nᵀ A_n, M_q⟩_F``

    Args:
        A: ``[N, T, din]`` layer inputs of N examples (T tokens each).
        G: ``[N, T, dout]`` output gradients of the same examples.
        M: ``[Q, dout, din]`` one dense matrix per query (e.g. a preconditioned query gradient).
        a_mask: ``[N, T]`` bool, False for tokens that contribute nothing (padding).
        backend: one of ``fastinf.ops.BACKENDS`` or None (see the package doc): ``"cpu"`` runs
            the C++ kernel where it measured faster and torch otherwise, ``"cpp"`` forces it.
        contraction: ``"token"``, ``"materialize"`` or None to let the cost model choose.
        check_finite: raise ``ValueError`` naming the argument and example if the result is
            not finite; None (default) checks on CPU only, as a check on a GPU would
            synchronise every call (the capture there checks every loss and gradient).

    Inputs are float32, float16 or bfloat16 (float64 with ``backend="reference"``); the result
    is float32 ``[N, Q]`` (float64 for float64 inputs).
    """
    validate(A, G, M, a_mask)
    contraction = c.check_contraction(OP, contraction, CONTRACTIONS)
    backend = c.resolve_backend(OP, backend, A.device, A.dtype)
    A, G, M = (x.detach() for x in (A, G, M))
    out = c.dispatch(_score_dense_op, _run, A, G, M, a_mask, backend, contraction)
    return c.check_result(OP, out, check_finite, {"A": A, "G": G, "M": M},
                          {"A": a_mask, "G": a_mask})
