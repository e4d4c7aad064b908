"""``score_factored``: scores between per-example gradients held in factored (token) form.

``S[n, q] = Σ_t Σ_s (A[n,t]·V[q,s]) (G[n,t]·U[q,s])``, i.e. ``⟨G_nᵀ A_n, U_qᵀ V_q⟩_F`` without
forming either gradient. Used by ghost TracIn (V, U = query tokens), EK-FAC low-rank queries
(V, U = the rank-r factors R, L) and low-rank stores.

Two contraction orders, chosen per call by the FLOP cost model of :mod:`._dispatch`:

* ``"factored"`` (ghost): token-pair Gram products, ``2·N·Q·T·S·(din+dout)`` FLOPs, fused in the
  backend kernels (C++, Triton, CUDA) so the ``[N, T, Q, S]`` intermediates never exist;
* ``"materialize"``: per-example gradients ``D_n = G_nᵀ A_n`` built in chunks of their rows and
  contracted with the query gradients by GEMM, ``2·dout·din·(N·T + Q·S + N·Q)`` FLOPs.

Memory is bounded by the workspace (``FASTINF_WORKSPACE_MB``), never proportional to N·din·dout
or N·Q·T·S.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _common as c
from . import _dispatch as d

OP = "score_factored"
CONTRACTIONS = ("factored", "materialize")

# CPU bytes of each side's chunk of gradients in the "materialize" contraction (the train
# examples' D and the queries' E): 128 train examples x 256 rank-32 queries of a 1024 x 257 layer
# (T = 48, 2 threads) took 151 ms in 32 MiB chunks against 146 ms in the 128 MiB of half the
# default workspace, and 100 vs 99 ms at 688 x 256; the two buffers stay alive between calls
# (:func:`._common.scratch`), 130 MB of the rank-32 pairwise's peak on the GPT-2 benchmark.
# Chunks run over the rows of the longer side (1025 x 256: 153 ms in 16 MiB chunks, 184 ms
# with the rows of the shorter side).
SIDE_TILE = 32 * 2**20


# --------------------------------------------------------------------------- reference
def score_factored_reference(A, G, V, U, a_mask=None, v_mask=None):
    """Pure-torch reference, straight from the formula, chunked over examples and queries.

    Computes in float64 for float64 inputs (the test oracle), else in float32.
    """
    dt = torch.float64 if A.dtype == torch.float64 else torch.float32
    N, T, _ = A.shape
    Q, S, _ = V.shape
    out = torch.zeros(N, Q, dtype=dt, device=A.device)
    if N == 0 or Q == 0:
        return out
    per_pair = 3 * T * S * torch.finfo(dt).bits // 8
    qc = c.chunk(Q, per_pair)
    nc = c.chunk(N, per_pair * qc)
    for q0 in range(0, Q, qc):
        Vq, Uq = V[q0:q0 + qc].to(dt), U[q0:q0 + qc].to(dt)
        vm = None if v_mask is None else v_mask[q0:q0 + qc]
        for n0 in range(0, N, nc):
            An, Gn = A[n0:n0 + nc].to(dt), G[n0:n0 + nc].to(dt)
            ka = torch.einsum("ntd,qsd->ntqs", An, Vq)
            kg = torch.einsum("nte,qse->ntqs", Gn, Uq)
            prod = ka * kg
            if a_mask is not None:
                prod = torch.where(a_mask[n0:n0 + nc, :, None, None], prod, 0.0)
            if vm is not None:
                prod = torch.where(vm[None, None], prod, 0.0)
            out[n0:n0 + nc, q0:q0 + qc] = prod.sum(dim=(1, 3))
    return out


# --------------------------------------------------------------------------- torch formulations
def materialize_torch(A, G, V, U, a_mask=None, v_mask=None):
    """Per-example gradients ``D_n = G_nᵀ A_n`` and ``E_q = U_qᵀ V_q``, then GEMMs, in chunks
    of their rows (of their longer side): ``out += D[:, e0:e1, :] · E[:, e0:e1, :]ᵀ``. Output
    float32 [N, Q].

    A chunk holds all examples and all queries (tiles of them only beyond half the workspace
    each; on the CPU beyond :data:`SIDE_TILE`), so every gradient is built once. Tiles of whole
    gradients rebuilt the inner side once per outer tile: a 4096x4096 layer's ``D_n`` (2 per
    tile) Q/2 times, minutes of H200 time at N=8192, Q=1024. Off the CPU the GEMMs run in the inputs' dtype (fp32 accumulation,
    each chunk's partial score rounded once and summed in fp32).
    """
    N, T, din = A.shape
    Q, S, dout = U.shape
    out = torch.zeros(N, Q, dtype=torch.float32, device=A.device)
    if N == 0 or Q == 0:
        return out
    dt = c.compute_dtype(A)
    A, G = c.mask_rows(A, a_mask), c.mask_rows(G, a_mask)
    V, U = c.mask_rows(V, v_mask), c.mask_rows(U, v_mask)
    if din > dout:      # chunks over the rows of the longer side: <GᵀA, UᵀV> = <AᵀG, VᵀU>
        A, G, V, U, din, dout = G, A, U, V, dout, din
    half = c.workspace_bytes() // 2
    if A.device.type == "cpu":
        half = min(half, SIDE_TILE)
    row = din * dt.itemsize                                     # one row of one gradient
    nc, qc = c.chunk(N, row, half), c.chunk(Q, row, half)
    ec = max(1, half // (max(nc, qc) * row))                   # rows per chunk, evened out
    ec = -(-dout // -(-dout // ec))
    def grads(X, Y, i, e, key):
        Yi, Xi = Y[i, :, e].to(dt).transpose(1, 2), X[i].to(dt)
        buf = c.scratch(key, (Yi.shape[0], Yi.shape[1], din), dt, A.device)
        return torch.bmm(Yi, Xi, out=buf)
    for n0 in range(0, N, nc):
        for q0 in range(0, Q, qc):
            for e0 in range(0, dout, ec):
                e = slice(e0, e0 + ec)
                Dk = grads(A, G, slice(n0, n0 + nc), e, "score_factored.D").flatten(1)
                Ek = grads(V, U, slice(q0, q0 + qc), e, "score_factored.E").flatten(1)
                out[n0:n0 + nc, q0:q0 + qc] += Dk @ Ek.T
    return out


def factored_torch(A, G, V, U, a_mask=None, v_mask=None):
    """Ghost products with torch GEMMs on tiles of (examples x queries). Output float32 [N, Q]."""
    N, T, din = A.shape
    Q, S, dout = U.shape
    out = torch.empty(N, Q, dtype=torch.float32, device=A.device)
    if N == 0 or Q == 0:
        return out
    dt = c.compute_dtype(A)
    A, G = c.mask_rows(A, a_mask), c.mask_rows(G, a_mask)
    V, U = c.mask_rows(V, v_mask), c.mask_rows(U, v_mask)
    per_pair = 3 * T * S * 4
    qc = c.chunk(Q, per_pair)
    nc = c.chunk(N, per_pair * qc)
    for q0 in range(0, Q, qc):
        Vq = V[q0:q0 + qc].to(dt).reshape(-1, din)
        Uq = U[q0:q0 + qc].to(dt).reshape(-1, dout)
        q1 = min(Q, q0 + qc)
        for n0 in range(0, N, nc):
            n1 = min(N, n0 + nc)
            ka = A[n0:n1].to(dt).reshape(-1, din) @ Vq.T
            kg = G[n0:n1].to(dt).reshape(-1, dout) @ Uq.T
            if T == 1 and S == 1:
                out[n0:n1, q0:q1] = ka.float() * kg.float()
            else:
                prod = (ka.float() * kg.float()).view(n1 - n0, T, q1 - q0, S)
                out[n0:n1, q0:q1] = prod.sum(dim=(1, 3))
    return out


# --------------------------------------------------------------------------- fused kernels
def _cpp(A, G, V, U, a_mask, v_mask):
    C = c.require_native(OP)
    N, T, din = A.shape
    Q, S, dout = U.shape
    A, G, V, U = (x.float().contiguous() for x in (A, G, V, U))
    am, vm = c.contiguous(a_mask), c.contiguous(v_mask)
    out = torch.empty(N, Q, dtype=torch.float32)
    if N and Q:
        C.score_factored_cpu(A.data_ptr(), G.data_ptr(), V.data_ptr(), U.data_ptr(), c.ptr(am),
                             c.ptr(vm), out.data_ptr(), N, T, Q, S, din, dout)
    return out


def _cuda(A, G, V, U, a_mask, v_mask):
    C = c.require_native(OP)
    N, T, din = A.shape
    Q, S, dout = U.shape
    A, G, V, U = (x.contiguous() for x in (A, G, V, U))
    am, vm = c.contiguous(a_mask), c.contiguous(v_mask)
    out = torch.empty(N, Q, dtype=torch.float32, device=A.device)
    if N and Q:
        with torch.cuda.device(A.device):
            C.score_factored_cuda(A.data_ptr(), G.data_ptr(), V.data_ptr(), U.data_ptr(),
                                  c.ptr(am), c.ptr(vm), out.data_ptr(), N, T, Q, S, din, dout,
                                  c.CUDA_DTYPE_CODES[A.dtype], c.cuda_stream(A.device))
    return out


def _triton(A, G, V, U, a_mask, v_mask):
    from ..triton.score_factored import score_factored_triton  # optional dependency

    return score_factored_triton(A, G, V, U, a_mask, v_mask)


# implementation names of the dispatch table -> functions
_IMPL = {"reference": score_factored_reference, "materialize": materialize_torch,
         "torch": factored_torch, "cpp": _cpp, "triton": _triton, "cuda": _cuda}


def _run(A, G, V, U, a_mask, v_mask, backend: str, contraction: str) -> torch.Tensor:
    (N, T, din), (Q, S, dout) = A.shape, U.shape
    impl = d.implementation(OP, backend, contraction, A.device.type, A.dtype,
                            N=N, T=T, Q=Q, S=S, din=din, dout=dout)
    return _IMPL[impl](A, G, V, U, a_mask, v_mask)


@torch.library.custom_op("fastinf::score_factored", mutates_args=())
def _score_factored_op(A: torch.Tensor, G: torch.Tensor, V: torch.Tensor, U: torch.Tensor,
                       a_mask: Optional[torch.Tensor], v_mask: Optional[torch.Tensor],
                       backend: str, contraction: str) -> torch.Tensor:
    return _run(A, G, V, U, a_mask, v_mask, backend, contraction)


@_score_factored_op.register_fake
def _(A, G, V, U, a_mask, v_mask, backend, contraction):
    dt = torch.float64 if A.dtype == torch.float64 else torch.float32
    return A.new_empty((A.shape[0], V.shape[0]), dtype=dt)


# --------------------------------------------------------------------------- public API
def validate(A, G, V, U, a_mask=None, v_mask=None):
    """Checks the arguments of :func:`score_factored`; returns ``(N, T, Q, S, din, dout)``."""
    c.check_tensor(OP, "A", A, ("N", "T", "din"))
    c.check_tensor(OP, "G", G, ("N", "T", "dout"))
    c.check_tensor(OP, "V", V, ("Q", "S", "din"))
    c.check_tensor(OP, "U", U, ("Q", "S", "dout"))
    c.check_same(OP, {"A": A, "G": G, "V": V, "U": U})
    N, T, din = A.shape
    c.check_dim(OP, "G", G, 0, N, "from A", ("N", "T", "dout"))
    c.check_dim(OP, "G", G, 1, T, "from A", ("N", "T", "dout"))
    dout = G.shape[2]
    Q, S = V.shape[0], V.shape[1]
    c.check_dim(OP, "V", V, 2, din, "from A", ("Q", "S", "din"))
    c.check_dim(OP, "U", U, 0, Q, "from V", ("Q", "S", "dout"))
    c.check_dim(OP, "U", U, 1, S, "from V", ("Q", "S", "dout"))
    c.check_dim(OP, "U", U, 2, dout, "from G", ("Q", "S", "dout"))
    c.check_mask(OP, "a_mask", a_mask, (N, T), "A", A.device)
    c.check_mask(OP, "v_mask", v_mask, (Q, S), "V", V.device)
    return N, T, Q, S, din, dout


def score_factored(A: torch.Tensor, G: torch.Tensor, V: torch.Tensor, U: torch.Tensor, *,
                   a_mask: Optional[torch.Tensor] = None, v_mask: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None, contraction: Optional[str] = None,
                   check_finite: Optional[bool] = None) -> torch.Tensor:
    """Scores between factored per-example gradients.

    ``S[n, q] = Σ_t Σ_s (A[n,t]·V[q,s]) (G[n,t]·U[q,s]) = ⟨G_nᵀ A_n, U_qᵀ V_q⟩_F``

    Args:
        A: ``[N, T, din]`` layer inputs of N examples (T tokens each).
        G: ``[N, T, dout]`` output gradients of the same examples.
        V: ``[Q, S, din]`` left factors of Q queries (query inputs, or the rank factor R).
        U: ``[Q, S, dout]`` right factors of the queries (query output gradients, or L).
        a_mask: ``[N, T]`` bool, False for tokens of A/G that contribute nothing (padding).
        v_mask: ``[Q, S]`` bool, likewise for V/U.
        backend: one of ``fastinf.ops.BACKENDS`` or None (see the package doc): ``"cpu"`` runs
            the C++ kernel where it measured faster and torch otherwise, ``"cpp"`` forces it.
        contraction: ``"factored"``, ``"materialize"`` or None to let the cost model choose.
        check_finite: raise ``ValueError`` naming the argument and example if the result is
            not finite; None (default) checks on CPU only, as a check on a GPU would
            synchronise every call (the capture there checks every loss and gradient).

    Inputs are float32, float16 or bfloat16 (float64 with ``backend="reference"``), all on one
    device with one dtype; accumulation is float32 and the result is float32 ``[N, Q]``
    (float64 for float64 inputs).
    """
    validate(A, G, V, U, a_mask, v_mask)
    contraction = c.check_contraction(OP, contraction, CONTRACTIONS)
    backend = c.resolve_backend(OP, backend, A.device, A.dtype)
    A, G, V, U = (x.detach() for x in (A, G, V, U))
    out = c.dispatch(_score_factored_op, _run, A, G, V, U, a_mask, v_mask, backend, contraction)
    return c.check_result(OP, out, check_finite, {"A": A, "G": G, "V": V, "U": U},
                          {"A": a_mask, "G": a_mask, "V": v_mask, "U": v_mask})
