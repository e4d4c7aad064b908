"""``ekfac_lambda``: the EK-FAC eigenvalue correction, summed over a batch.

``Λ_sum[o, i] = Σ_n ((G_n Q_S)ᵀ (A_n Q_A))[o, i]²`` — the squared per-example gradients in the
Kronecker eigenbasis, summed over the N examples (the caller divides by the total example count).

Two contraction orders, chosen per call by the FLOP cost model of :mod:`._dispatch`:

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
from . import _dispatch as d

OP = "ekfac_lambda"
CONTRACTIONS = ("rotate", "materialize")


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
    """``(A Q_A, G Q_S)`` in the compute dtype (float32 for half inputs), masked rows zeroed
    and never read (:func:`._common.rotate_rows`: on the CPU padding costs no GEMM FLOPs)."""
    dt = c.compute_dtype(A)
    return c.rotate_tokens(A.to(dt), G.to(dt), QA.to(dt), QS.to(dt), a_mask)


def _sum_sq_tiles(At, Gt, out):
    """``out += Σ_n (Gt_nᵀ At_n)^∘2`` over tiles of examples (float32 accumulation)."""
    N, T, din = At.shape
    dout = Gt.shape[2]
    per = dout * din * 4
    nc = c.chunk(N, per, c.CPU_CACHE_TILE) if At.device.type == "cpu" else c.chunk(N, 2 * per)
    for n0 in range(0, N, nc):
        R = torch.bmm(Gt[n0:n0 + nc].transpose(1, 2), At[n0:n0 + nc])
        out += R.square_().sum(0).float()     # in place: no second [nc, dout, din] tile
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
    dt = c.compute_dtype(A)
    A, G = c.mask_rows(A, a_mask), c.mask_rows(G, a_mask)
    QA, QS = QA.to(dt), QS.to(dt)
    nc = c.chunk(N, 3 * dout * din * 4)
    for n0 in range(0, N, nc):
        D = torch.bmm(G[n0:n0 + nc].to(dt).transpose(1, 2), A[n0:n0 + nc].to(dt))
        R = torch.matmul(QS.T, torch.matmul(D, QA))
        out += R.square_().sum(0).float()
    return out


# --------------------------------------------------------------------------- fused kernels
def _rotate_f32(A, G, QA, QS):
    """``(A Q_A, G Q_S)`` by float32 GEMMs, contiguous (tokens ``[..., d]`` of any leading shape)."""
    return (A.float() @ QA.float()).contiguous(), (G.float() @ QS.float()).contiguous()


def _rotated(launch):
    """A fused backend: rotates the tokens by float32 GEMMs, then ``launch(At, Gt, a_mask, out)``
    sums the squared per-example products (masked rows may hold garbage: the kernels skip them)."""
    def run(A, G, QA, QS, a_mask):
        out = torch.zeros(G.shape[2], A.shape[2], dtype=torch.float32, device=A.device)
        if A.shape[0] == 0:
            return out
        At, Gt = _rotate_f32(A, G, QA, QS)
        return launch(At, Gt, c.contiguous(a_mask), out)
    return run


CPP_CHUNK_ROWS = 0   # tokens per chunk of examples in the C++ kernel (0: sized for its L2 cache)
CPP_ISA = 0          # best instruction set of the C++ kernel (0 any, 1 baseline, 2 AVX2, 3 AVX-512)


def kept_index(a_mask, N: int, T: int, device):
    """``(rows, offsets)`` of examples ``[N, T]`` under ``a_mask``: the flat indices of the kept
    tokens (None when every token is kept) and the example row offsets ``[N + 1]`` (int64)."""
    if a_mask is None or bool(a_mask.all()):
        return None, torch.arange(0, (N + 1) * T, T, dtype=torch.int64, device=device)
    offs = torch.zeros(N + 1, dtype=torch.int64, device=device)
    torch.cumsum(a_mask.sum(1), 0, out=offs[1:])
    return a_mask.reshape(-1).nonzero().squeeze(1), offs


def take_rows(X, rows):
    """The rows ``rows`` (None: all, a view) of ``X [N, T, d]`` flattened to ``[N·T, d]``."""
    X2 = X.reshape(-1, X.shape[-1])
    return X2 if rows is None else X2.index_select(0, rows)


def kept_rows(A, G, a_mask=None):
    """The kept tokens as rows: ``A [R, din]``, ``G [R, dout]`` (the R unmasked tokens of all
    examples, in order; views when nothing is masked) and the example row offsets ``[N + 1]``
    (int64), the ``offsets=`` form of :func:`ekfac_lambda`."""
    rows, offs = kept_index(a_mask, A.shape[0], A.shape[1], A.device)
    return take_rows(A, rows), take_rows(G, rows), offs


def padded(A, G, offsets):
    """The ``offsets=`` form back as ``[N, T, ·]`` examples padded with zeros to the longest
    (T = 1 when all are empty) and their ``[N, T]`` mask."""
    N = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    T = max(1, int(counts.max())) if N else 1
    mask = torch.arange(T, device=A.device)[None, :] < counts[:, None].to(A.device)
    A3 = A.new_zeros(N, T, A.shape[1])
    G3 = G.new_zeros(N, T, G.shape[1])
    A3[mask] = A
    G3[mask] = G
    return A3, G3, mask


def _cpp_rows(A2, G2, QA, QS, offs):
    """C++ kernel on kept rows ``[R, ·]`` with example offsets: register tiles of Λ summed
    example by example, no per-example tensor and no padding rows multiplied."""
    N, din, dout = offs.numel() - 1, A2.shape[1], G2.shape[1]
    out = torch.zeros(dout, din, dtype=torch.float32, device=A2.device)
    if N == 0 or A2.shape[0] == 0:
        return out
    At, Gt = _rotate_f32(A2, G2, QA, QS)
    offs = offs.to(torch.int64).contiguous()
    c.require_native(OP).ekfac_lambda_cpu(At.data_ptr(), Gt.data_ptr(), offs.data_ptr(),
                                          out.data_ptr(), N, din, dout, CPP_CHUNK_ROWS,
                                          CPP_ISA)
    return out


def _cpp(A, G, QA, QS, a_mask):
    """C++ kernel on the kept rows (:func:`kept_rows`)."""
    A2, G2, offs = kept_rows(A, G, a_mask)
    return _cpp_rows(A2, G2, QA, QS, offs)


@_rotated
def _cuda(At, Gt, am, out):
    with torch.cuda.device(At.device):
        c.require_native(OP).ekfac_lambda_cuda(At.data_ptr(), Gt.data_ptr(), c.ptr(am),
                                               out.data_ptr(), *At.shape, Gt.shape[2],
                                               c.CUDA_DTYPE_CODES[At.dtype],
                                               c.cuda_stream(At.device))
    return out


@_rotated
def _triton(At, Gt, am, out):
    from ..triton.ekfac_lambda import ekfac_lambda_triton  # optional dependency

    return ekfac_lambda_triton(At, Gt, am)


# implementation names of the dispatch table -> functions
_IMPL = {"reference": ekfac_lambda_reference, "materialize": materialize_torch,
         "torch": rotate_torch, "cpp": _cpp, "triton": _triton, "cuda": _cuda}


def _run(A, G, QA, QS, a_mask, backend: str, contraction: str) -> torch.Tensor:
    (N, T, din), dout = A.shape, G.shape[2]
    impl = d.implementation(OP, backend, contraction, A.device.type, A.dtype,
                            N=N, T=T, din=din, dout=dout)
    return _IMPL[impl](A, G, QA, QS, a_mask)


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
    c.check_same(OP, {"A": A, "G": G})
    N, T, din = A.shape
    c.check_dim(OP, "G", G, 0, N, "from A", ("N", "T", "dout"))
    c.check_dim(OP, "G", G, 1, T, "from A", ("N", "T", "dout"))
    dout = G.shape[2]
    _check_bases(A, QA, QS, din, dout)
    c.check_mask(OP, "a_mask", a_mask, (N, T), "A", A.device)
    return N, T, din, dout


def _check_bases(A, QA, QS, din, dout):
    """QA ``[din, din]`` and QS ``[dout, dout]``, float, on A's device."""
    for name, q, d, dims, src in (("QA", QA, din, ("din", "din"), "A"),
                                  ("QS", QS, dout, ("dout", "dout"), "G")):
        c.check_tensor(OP, name, q, dims)
        if q.device != A.device:
            raise ValueError(f"{OP}: arguments 'A' and '{name}' are on different devices "
                             f"({A.device} and {q.device})")
        c.check_dim(OP, name, q, 0, d, "from " + src, dims)
        c.check_dim(OP, name, q, 1, d, "from " + src, dims)


def validate_rows(A, G, QA, QS, offsets, a_mask=None):
    """Checks the ``offsets=`` form of :func:`ekfac_lambda`; returns ``(N, T, din, dout)``
    with T the most tokens of an example."""
    if a_mask is not None:
        raise ValueError(f"{OP}: pass either 'a_mask' (A [N, T, din]) or 'offsets' (A [R, din], "
                         "the kept tokens only), not both")
    c.check_tensor(OP, "A", A, ("R", "din"))
    c.check_tensor(OP, "G", G, ("R", "dout"))
    c.check_same(OP, {"A": A, "G": G})
    c.check_dim(OP, "G", G, 0, A.shape[0], "from A", ("R", "dout"))
    if (not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 1
            or offsets.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"{OP}: argument 'offsets' must be a 1-D int64 tensor [N + 1] of row "
                        f"offsets, got {getattr(offsets, 'dtype', type(offsets).__name__)} of "
                        f"shape {tuple(getattr(offsets, 'shape', ()))}")
    o = offsets.cpu()
    if int(o[0]) != 0 or int(o[-1]) != A.shape[0] or bool((o[1:] < o[:-1]).any()):
        raise ValueError(f"{OP}: argument 'offsets' must rise from 0 to the row count of A "
                         f"({A.shape[0]}), got {o.tolist()[:8]}{' ...' if o.numel() > 8 else ''}")
    din, dout = A.shape[1], G.shape[1]
    _check_bases(A, QA, QS, din, dout)
    N = o.numel() - 1
    T = int((o[1:] - o[:-1]).max()) if N else 0
    return N, T, din, dout


def ekfac_lambda(A: torch.Tensor, G: torch.Tensor, QA: torch.Tensor, QS: torch.Tensor, *,
                 a_mask: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None, contraction: Optional[str] = None,
                 check_finite: Optional[bool] = None) -> torch.Tensor:
    """EK-FAC eigenvalue correction of a batch, summed over its examples.

    ``Λ_sum = Σ_n ((G_n Q_S)ᵀ (A_n Q_A))^∘2``

    Args:
        A: ``[N, T, din]`` layer inputs of N examples (T tokens each).
        G: ``[N, T, dout]`` output gradients of the same examples.
        QA: ``[din, din]`` eigenvectors of the input covariance (columns).
        QS: ``[dout, dout]`` eigenvectors of the gradient covariance (columns).
        a_mask: ``[N, T]`` bool, False for tokens that contribute nothing (padding).
        offsets: instead of ``a_mask``, the kept tokens only: ``A [R, din]`` and ``G [R, dout]``
            hold the R kept tokens of all examples in order, example n the rows
            ``offsets[n] .. offsets[n+1]`` (int64 ``[N + 1]``, from 0 to R; see
            :func:`kept_rows`). The C++ kernel reads them as they are; the other backends pad
            them back to ``[N, T, ·]`` with a mask.
        backend: one of ``fastinf.ops.BACKENDS`` or None (see the package doc): ``"cpu"`` runs
            the C++ kernel where it measured faster and torch otherwise, ``"cpp"`` forces it.
        contraction: ``"rotate"``, ``"materialize"`` or None to let the cost model choose.
        check_finite: raise ``ValueError`` naming the argument and example if the result is
            not finite; None (default) checks on CPU only, as a check on a GPU would
            synchronise every call (the capture there checks every loss and gradient).

    Inputs are float32, float16 or bfloat16 (float64 with ``backend="reference"``); QA/QS may be
    of any float dtype. The result is float32 ``[dout, din]`` (float64 for float64 inputs).
    """
    if offsets is not None:
        return _rows_form(A, G, QA, QS, offsets, a_mask, backend, contraction, check_finite)
    validate(A, G, QA, QS, a_mask)
    contraction = c.check_contraction(OP, contraction, CONTRACTIONS)
    backend = c.resolve_backend(OP, backend, A.device, A.dtype)
    A, G, QA, QS = (x.detach() for x in (A, G, QA, QS))
    out = c.dispatch(_ekfac_lambda_op, _run, A, G, QA, QS, a_mask, backend, contraction)
    return c.check_result(OP, out, check_finite, {"A": A, "G": G}, {"A": a_mask, "G": a_mask})


def _rows_form(A, G, QA, QS, offsets, a_mask, backend, contraction, check_finite):
    """:func:`ekfac_lambda` with ``offsets=``: the C++ kernel where the dispatch picks it,
    else the padded form through the usual path."""
    N, T, din, dout = validate_rows(A, G, QA, QS, offsets, a_mask)
    backend = c.resolve_backend(OP, backend, A.device, A.dtype)
    A, G, QA, QS = (x.detach() for x in (A, G, QA, QS))
    impl = d.implementation(OP, backend, c.check_contraction(OP, contraction, CONTRACTIONS),
                            A.device.type, A.dtype, N=N, T=max(T, 1), din=din, dout=dout)
    if impl == "cpp":
        out = _cpp_rows(A, G, QA, QS, offsets.to(A.device))
        if not c.has_nonfinite(out, check_finite):
            return out
    A3, G3, mask = padded(A, G, offsets.to(A.device))
    return ekfac_lambda(A3, G3, QA, QS, a_mask=mask, backend=backend, contraction=contraction,
                        check_finite=check_finite)
