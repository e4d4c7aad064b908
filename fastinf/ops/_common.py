"""Shared plumbing of the ops: validation at the Python boundary, backend resolution, tiling.

Every op validates here (dtype, device, rank, size agreement) and raises ``TypeError`` /
``ValueError`` naming the argument, what was given and what was expected; the compiled kernels
only ever see contiguous tensors of the right shapes.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from typing import Optional, Sequence

import torch

from .._native import BACKENDS, backends, native, triton_interpret
from ._dispatch import ORDER

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def workspace_bytes() -> int:
    """Bytes one op may use for an intermediate tile (env ``FASTINF_WORKSPACE_MB``, default 256)."""
    return int(float(os.environ.get("FASTINF_WORKSPACE_MB", "256")) * 2**20)


def _fmt(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_tensor(op: str, name: str, x, dims: Sequence[str], *, allow_float64: bool = True):
    """Checks that ``x`` is a floating tensor of rank ``len(dims)``; ``dims`` names its axes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor of shape "
                        f"[{', '.join(dims)}], got {type(x).__name__}")
    if x.dim() != len(dims):
        raise ValueError(f"{op}: argument '{name}' must have {len(dims)} dimensions "
                         f"[{', '.join(dims)}], got shape {_fmt(x.shape)}")
    ok = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if x.dtype not in ok:
        raise TypeError(f"{op}: argument '{name}' has dtype {x.dtype}; expected one of "
                        f"{', '.join(str(d) for d in ok)}")


def check_mask(op: str, name: str, m, shape, ref_name: str, device):
    if m is None:
        return None
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a bool torch.Tensor or None, "
                        f"got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise TypeError(f"{op}: argument '{name}' must have dtype torch.bool, got {m.dtype}")
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{op}: argument '{name}' has shape {_fmt(m.shape)}; expected "
                         f"{_fmt(shape)} (the first two dimensions of '{ref_name}')")
    if m.device != device:
        raise ValueError(f"{op}: argument '{name}' is on {m.device}, but '{ref_name}' is on {device}")
    return m


def check_same(op: str, tensors: dict):
    """All tensors on one device and of one dtype."""
    names = list(tensors)
    first = tensors[names[0]]
    for n in names[1:]:
        t = tensors[n]
        if t.device != first.device:
            raise ValueError(f"{op}: arguments '{names[0]}' and '{n}' are on different devices "
                             f"({first.device} and {t.device})")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: arguments '{names[0]}' and '{n}' have different dtypes "
                            f"({first.dtype} and {t.dtype}); cast them to one dtype")


def check_dim(op: str, name: str, x, axis: int, expected: int, what: str, dims: Sequence[str]):
    if x.shape[axis] != expected:
        raise ValueError(f"{op}: argument '{name}' has shape {_fmt(x.shape)}; expected "
                         f"[{', '.join(dims)}] with {dims[axis]}={expected} ({what})")


@torch.compiler.assume_constant_result
def _usable(name: str, device_type: str) -> bool:
    # A constant under torch.compile: backend availability is resolved once, outside the graph.
    return _usable_cached(name, device_type)


@functools.lru_cache(maxsize=None)
def _usable_cached(name: str, device_type: str) -> bool:
    if not backends()[name].available:
        return False
    if name in ("cpu", "cpp", "cuda"):
        return device_type == ("cuda" if name == "cuda" else "cpu")
    if name == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpret())
    return True


def default_preference(device: torch.device):
    """Backend order for ``backend=None`` (the dispatch table's ``ORDER``), torch last."""
    return ORDER.get(device.type, ("torch",))


def resolve_backend(op: str, backend: Optional[str], device: torch.device,
                    dtype: torch.dtype) -> str:
    """The backend to run: ``backend`` when given (checked), else the first usable of
    :func:`default_preference`."""
    if dtype == torch.float64:
        if backend not in (None, "reference"):
            raise TypeError(f"{op}: float64 inputs are supported by backend='reference' only, "
                            f"got backend={backend!r}; cast the inputs to float32")
        return "reference"
    if backend is None:
        return next((b for b in default_preference(device) if _usable(b, device.type)), "torch")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} "
                         "or None (fastest available)")
    if not _usable(backend, device.type):
        st = backends()[backend]
        why = st.detail if not st.available else f"it does not run on {device.type} tensors"
        raise ValueError(f"{op}: backend {backend!r} is not usable for inputs on {device}: {why}")
    return backend


def check_contraction(op: str, contraction, allowed) -> str:
    """``contraction`` checked against the op's orders; None becomes ``"auto"`` (the cost model)."""
    if contraction not in (None,) + tuple(allowed):
        raise ValueError(f"{op}: unknown contraction {contraction!r}; expected one of "
                         f"{', '.join(allowed)} or None")
    return contraction or "auto"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the torch formulations' GEMMs: fp16/bf16 GEMMs on CPU are slow and inexact, so
    float32 there; the input dtype elsewhere."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


# Bytes of a tile of per-example products that the CPU reduces (squares, sums) right after the
# GEMM that wrote it, while it is in cache: 4-example tiles of a 1024 x 257 layer (4 MiB) took
# 0.05 s against 0.11 s for 128-example tiles (256 x 48 tokens, 2 threads). GPUs keep
# workspace-sized tiles (one launch per tile).
CPU_CACHE_TILE = 4 * 2**20


_SCRATCH = threading.local()


def scratch(key: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A ``shape`` tensor for a temporary that does not outlive the next call with the same
    ``key`` (a tile an op writes, contracts and drops), carved from a grow-only buffer per key
    and thread: a fresh CPU allocation of tens of MB pays its page faults on every call (about
    a quarter of the time of the tiles it holds on the d=256 transformer's scoring). Held until
    :func:`release_scratch` (fastinf.scoring calls it when a scoring call ends)."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    n = 1
    for d in shape:
        n *= int(d)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    buf = bufs.get(key)
    if buf is None or buf.numel() < nbytes or buf.device != torch.device(device):
        buf = bufs[key] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buf[:nbytes].view(dtype).view(tuple(shape))


def release_scratch() -> None:
    """Frees this thread's :func:`scratch` buffers."""
    _SCRATCH.bufs = {}


_LIBC: list = []


def release_heap() -> None:
    """Returns the C heap's free memory to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    CPU tensors of up to 32 MB come from the C heap once glibc's dynamic mmap threshold has
    risen (it does after the first large free), and glibc keeps what they freed: between the
    groups of layers of the GPT-2 benchmark's exact pairwise (:func:`fastinf.scoring.
    query_batches`) 560 MB of freed train tiles and activations stayed resident, and the peak
    RSS fell from 1.64 to 1.40 GB, in the same time, with a trim at each group."""
    if not _LIBC:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL("libc.so.6").malloc_trim
                lib.argtypes, lib.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                lib = None
        _LIBC.append(lib)
    if _LIBC[0] is not None:
        _LIBC[0](0)


def chunk(total: int, per_item_bytes: float, budget: Optional[int] = None, minimum: int = 1) -> int:
    """How many items of ``per_item_bytes`` fit into the workspace budget (at least ``minimum``)."""
    budget = workspace_bytes() if budget is None else budget
    n = int(budget // max(per_item_bytes, 1.0))
    return max(minimum, min(max(total, 1), n))


def ptr(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def contiguous(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.contiguous()


def mask_rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` [B, T, d] with the rows of excluded tokens set to 0 (NaN-safe)."""
    if mask is None:
        return x
    return torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def rotate_rows(x: torch.Tensor, Q: torch.Tensor, mask: Optional[torch.Tensor],
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ Q`` for tokens ``x`` [B, T, d] with the rows of excluded tokens 0 (NaN-safe). On the
    CPU only the kept rows are multiplied (gathered, rotated, scattered into zeros): padding
    costs no GEMM FLOPs (12-13% less time at 19% padding, [32-128, 48, 256-688] @ [d, d]).
    Elsewhere the masked rows are zeroed and all rows multiplied (no host sync). The CPU's
    gathered rows and their products are taken in ~8 MiB chunks (at most one more token tile
    in flight, not two: ~50 MB less peak on a 128-example tile of a 1280-wide layer, the same
    GEMM rate at >= 1024 rows). ``out``: a
    contiguous ``[B, T, Q.shape[1]]`` to write into (returned)."""
    def mm(a):
        return a @ Q if out is None else torch.matmul(a, Q, out=out)
    if mask is None:
        return mm(x)
    if x.device.type != "cpu":
        return mm(mask_rows(x, mask))
    rows = mask.reshape(-1).nonzero().squeeze(1)
    if rows.numel() == mask.numel():
        return mm(x)
    B, T, d = x.shape
    if out is None:
        y = torch.zeros(B * T, Q.shape[1], dtype=torch.result_type(x, Q), device=x.device)
    else:
        y = out.view(B * T, Q.shape[1]).zero_()
    x2 = x.reshape(-1, d)
    step = max(1024, (8 << 20) // max(1, (d + Q.shape[1]) * x.element_size()))
    for r0 in range(0, rows.numel(), step):     # row chunks: ~8 MiB of gathered rows and
        r = rows[r0:r0 + step]                  # products, not two copies of the tokens
        y.index_copy_(0, r, x2.index_select(0, r) @ Q)
    return y.view(B, T, Q.shape[1]) if out is None else out


def rotate_tokens(A: torch.Tensor, G: torch.Tensor, QA: torch.Tensor, QS: torch.Tensor,
                  mask: Optional[torch.Tensor], out=None):
    """``(A Q_A, G Q_S)``: a layer's tokens rotated into its Kronecker eigenbasis, masked rows 0
    (:func:`rotate_rows`); ``out``: ``(A', G')`` to write them into."""
    oa, og = out if out is not None else (None, None)
    return rotate_rows(A, QA, mask, oa), rotate_rows(G, QS, mask, og)


def require_native(op: str):
    C = native()
    if C is None:
        raise RuntimeError(f"{op}: the compiled module fastinf._C is not loaded: "
                           f"{backends()['cpu'].detail}")
    return C


def check_result(op: str, out: torch.Tensor, check_finite: Optional[bool], tensors: dict,
                 masks: Optional[dict] = None) -> torch.Tensor:
    """``out``, or ValueError naming the first argument and example index holding NaN/Inf.

    Checks when :func:`has_nonfinite` says so. ``tensors`` maps names to [B, T, d] (or [B, ...])
    inputs; ``masks`` maps names to the [B, T] mask that applies (masked tokens are ignored).
    Finite inputs with a non-finite result mean float32 overflow, which is reported as such.
    """
    if not has_nonfinite(out, check_finite):
        return out
    masks = masks or {}
    for name, x in tensors.items():
        bad = ~torch.isfinite(x)
        while bad.dim() > 2:
            bad = bad.any(-1)
        m = masks.get(name)
        if m is not None:
            bad = bad & m
        if bad.dim() > 1:
            bad = bad.any(-1)
        if bool(bad.any()):
            idx = int(bad.nonzero()[0, 0])
            count = int(bad.sum())
            raise ValueError(f"{op}: argument '{name}' has non-finite values (NaN or Inf) in "
                             f"{count} example(s), the first at index {idx}")
    raise ValueError(f"{op}: the result overflowed (inputs are finite but intermediate values "
                     "exceed the float32 range); rescale the inputs")


def dispatch(custom_op, run, *args):
    """Calls an op through its ``torch.library`` custom op when traced (torch.compile, fake or
    meta tensors), and straight through ``run`` (the same implementation) in eager mode, which
    saves the dispatcher's overhead on small calls."""
    x = args[0]
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.device.type == "meta":
        return custom_op(*args)
    return run(*args)


def has_nonfinite(out: torch.Tensor, check_finite: Optional[bool]) -> bool:
    """True when the op's result should be checked and holds NaN/Inf.

    ``check_finite=None`` (the ops' default) checks on CPU only. On a GPU the check would cost a
    host synchronisation on every op call; there the capture already checks every loss and
    gradient once per pass, so non-finite inputs of the passes are caught before they reach the
    ops. ``True`` checks on every device (one sync per call on a GPU), ``False`` never. One
    reduction when all is finite (the common case); skipped under ``torch.compile``.
    """
    if check_finite is None:
        check_finite = out.device.type == "cpu"
    if not check_finite or out.numel() == 0 or torch.compiler.is_compiling():
        return False
    if bool(torch.isfinite(out.sum())):
        return False
    return not bool(torch.isfinite(out).all())


def truncated_svd(X: torch.Tensor, r: int, eigh_device=None):
    """``(L [B, m, k], R [B, n, k])`` with ``L Rᵀ`` the best rank-``k`` approximation of each
    matrix of ``X [B, m, n]`` (its rank-k truncated SVD ``U_k S_k V_kᵀ``), ``k = min(r, m, n)``;
    in ``X``'s dtype and device.

    Exact, not randomized: the top-k eigenvectors ``V`` of the Gram matrix on the smaller side
    (``X Xᵀ`` when m <= n, else ``Xᵀ X``; ``[B, s, s]``, s = min(m, n)) span the top-k singular
    subspace, so ``V Vᵀ X`` (or ``X V Vᵀ``) is ``U_k S_k V_kᵀ``. The factors are ``V`` (orthonormal)
    and ``Xᵀ V`` (or ``X V``): nothing is divided by a singular value, so zero and rank-deficient
    matrices give exact (zero) factors, never NaN. The Gram, its eigendecomposition and the
    second factor are computed in float64 (the Gram squares the condition number; float64 keeps
    the subspace as accurate as a float32 SVD of X), then cast. ``r >= min(m, n)`` returns the
    matrix itself (``X`` and an identity factor, an expanded view). Cost: the Gram
    (``2·B·s²·max(m, n)`` FLOPs) and one ``s × s`` eigh per matrix, against one ``m × n`` SVD
    per matrix for ``torch.linalg.svd`` (measured: bench/e2e/truncated_svd.py).

    CUDA: batched ``torch.linalg.svd`` and ``torch.linalg.eigh`` of matrices wider than 32 run
    one cuSOLVER call per matrix (gesvd / syevd: latency-bound, many small kernels each and
    host round trips; an H200 spent 54 s in the SVDs of the d=256 transformer's rank-32 queries,
    more than the same SVDs on 2 CPU threads). So by default (``eigh_device=None``) the Gram is
    formed on the GPU (the FLOPs), moved to the host (``B·s²`` float64, 34 MB for 64 queries of
    a 257-wide layer), eigendecomposed there by LAPACK, and the k eigenvectors (``B·s·k``) moved
    back; the values are then the CPU path's (same LAPACK call) up to the rounding of the
    Gram. Unmeasured on a GPU so far: ``eigh_device="cuda"`` keeps the eigh on the GPU, and
    bench/e2e/truncated_svd.py times both with the SVD baseline, to revisit the default with.
    """
    check_tensor("truncated_svd", "X", X, ("B", "m", "n"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"truncated_svd: argument 'r' must be a positive int, got {r!r}")
    B, m, n = X.shape
    s = min(m, n)
    k = min(r, s)
    if k == s:      # the matrix itself, an identity factor on the smaller side
        eye = torch.eye(s, dtype=X.dtype, device=X.device).expand(B, s, s)
        return (eye, X.mT) if m <= n else (X, eye)
    wide = m <= n
    Xd = X.to(torch.float64)
    G = Xd @ Xd.mT if wide else Xd.mT @ Xd
    if eigh_device is None:
        eigh_device = "cpu" if X.device.type == "cuda" else X.device
    V = torch.linalg.eigh(G.to(eigh_device)).eigenvectors[..., s - k:].flip(-1).to(X.device)
    W = Xd.mT @ V if wide else Xd @ V
    L, R = (V, W) if wide else (W, V)
    return L.to(X.dtype), R.to(X.dtype)


def _absmax(X: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 1]`` largest ``|x|`` of each matrix of ``X [B, m, n]`` (at least the dtype's
    smallest normal, so dividing by it is safe), by ``amax`` and ``amin`` over X's own layout:
    no ``abs`` copy of X, no reshape copy of a strided X. Not ``aminmax(dim=)``: on CPU torch
    2.13 it took 6.0 ms for X [32, 688, 256] against 0.34 ms for the two reductions (1.3 s of
    Llama's rank-32 queries)."""
    mx = X.amax(dim=(-2, -1))
    mn = X.amin(dim=(-2, -1))
    return torch.maximum(mx, -mn).clamp_min(torch.finfo(X.dtype).tiny)[:, None, None]


def _orthonormal(Y: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """An orthonormal basis ``[B, s, k]`` of the columns of ``Y`` (shifted Cholesky-QR on the
    float64 ``k × k`` Gram, ``passes`` times: batched GEMMs instead of one Householder QR per
    matrix; one pass leaves an orthogonality error of about eps·cond(Y)², enough between power
    rounds, two make it orthonormal to rounding), in ``Y``'s dtype (the power rounds pass a
    float32 ``Y``; the final basis takes one pass in float64, then one in the input's dtype).
    A rank-deficient ``Y`` gets orthonormal columns spanning its range plus arbitrary
    directions; a zero ``Y`` gives zeros."""
    eye = torch.eye(Y.shape[-1], dtype=torch.float64, device=Y.device)
    # scaled to a largest entry of 1 (a zero Y stays 0): no overflow or underflow in its Gram
    Y = Y / _absmax(Y)
    for _ in range(passes):
        G = (Y.mT @ Y).double()
        shift = 1e-13 * G.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1.0)
        C = torch.linalg.cholesky_ex(G + shift[:, None, None] * eye)[0]
        # Y C⁻ᵀ as a GEMM with the inverted k × k factor (a batched triangular solve against
        # the s × k Y ran one small trsm per matrix: 4.8 of 14 s on the transformer's queries)
        Y = Y @ torch.linalg.solve_triangular(C, eye, upper=False).mT.to(Y.dtype)
    return Y


@functools.lru_cache(maxsize=64)
def _gaussian(w: int, kp: int) -> torch.Tensor:
    """The range finder's ``[w, kp]`` Gaussian test matrix, float64 on the CPU from seed 0, drawn
    once per shape (0.9 ms of a 54 ms call at 688 x 56, 2 threads); never written to."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(w, kp, generator=g, dtype=torch.float64)


def randomized_svd(X: torch.Tensor, r: int, oversample: int = 24, power: int = 1):
    """``(L [B, m, k], R [B, n, k])`` with ``L Rᵀ`` a near-best rank-``k`` approximation of each
    matrix of ``X [B, m, n]`` (``k = min(r, m, n)``), by randomized subspace iteration (Halko,
    Martinsson, Tropp 2011, alg. 4.4): ``Y = A Ω`` with ``r + oversample`` Gaussian columns,
    ``power`` rounds ``Y ← A Aᵀ Y`` (re-orthonormalised), then Rayleigh–Ritz on ``span(Y)``
    (the ``(r+p) × (r+p)`` eigh in the big GEMMs' dtype, which sums its Gram), ``A`` the matrix
    or its transpose, whichever is wide.

    Not the exact truncation (:func:`truncated_svd`), which costs a ``min(m, n)``-wide eigh per
    matrix: on the d=256 transformer's rank-32 queries (spectra with σ₃₃/σ₃₂ ≈ 0.97, σ₆₅/σ₃₂ ≈
    0.2-0.6) the Frobenius error ``‖X - L Rᵀ‖`` was at most 1.4e-3 above the optimum
    ``‖X - X_k‖`` (3.5e-5 on average; oversample 32: 6e-4 and 1.2e-5 in 1.4x the time), in
    0.29x the exact path's time (bench/e2e/truncated_svd.py --real: 32 queries of each of the
    25 layers, 2 threads, 2026-12-05). That was ``power=2``; the default ``power=1`` saves a third
    of the big GEMMs (1.5 s of 19.6 on Llama's 256 rank-32 queries, bench/peers/transformer.py
    shapes) for scores 3.1e-3 (relative Frobenius) from the exact-truncation scores, Spearman
    0.99998, against 8.9e-4 with ``power=2`` and 3.9e-2 (Spearman 0.9976) with Kronfluence's
    default ``torch.svd_lowrank(q=r, niter=2)``. Exact where ``rank(X) ≤ r + oversample`` (the range is found), and
    where ``r + oversample ≥ min(m, n)`` (then computed by :func:`truncated_svd`). Ω comes from a
    fixed seed, drawn on the CPU, so every matrix's factors are the same in any batch and on
    any device up to rounding. Big GEMMs in X's dtype; the first pass over the final basis in
    float64, which float32 cannot replace (tests/test_truncated_svd.py, ill-conditioned spectra),
    the rest in X's dtype (4 ms of a 41-48 ms call at [32, 688, 256], 2 threads). The power
    rounds' tiles come from :func:`scratch` (held until :func:`release_scratch`)."""
    check_tensor("randomized_svd", "X", X, ("B", "m", "n"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"randomized_svd: argument 'r' must be a positive int, got {r!r}")
    B, m, n = X.shape
    wide = m <= n
    s, w = (m, n) if wide else (n, m)
    k = min(r, s)
    kp = min(s, k + oversample)
    if kp >= s or B == 0:
        return truncated_svd(X, r)
    dt = compute_dtype(X) if X.dtype != torch.float64 else torch.float64
    Xc = X.to(dt)
    A = Xc if wide else Xc.mT                                 # [B, s, w], s <= w
    # Each matrix's largest |entry| (read from X's own layout: no copy). A is not scaled (a
    # strided elementwise pass over the largest operand cost 30% of the time on the
    # transformer's tall queries); the small [B, w, kp] factors are divided instead, so the
    # power rounds stay O(|A|) and float32's range holds for entries from 1e-30 to 1e30.
    sc = _absmax(Xc)
    Y = A @ _gaussian(w, kp).to(dt).to(X.device)
    for _ in range(power):
        Yq = _orthonormal(Y, 1)
        # A (Aᵀ Yq / sc): outputs in grow-only scratch (a fresh 7 MB tile per round paid its
        # page faults every time)
        Z = torch.matmul(A.mT, Yq, out=scratch("rsvd.Z", (B, w, kp), dt, X.device)).div_(sc)
        Y = torch.matmul(A, Z, out=scratch("rsvd.Y", (B, s, kp), dt, X.device))
    # The final basis: one pass in float64 (Y's condition, about (σ₁/σ_kp)², may be 1e6 and
    # more), then a second pass in dt on the near-orthonormal result.
    Qb = _orthonormal(Y.double(), 1)
    Qb = _orthonormal(Qb.to(dt), 1)
    Bt = A.mT @ Qb                                            # [B, w, kp] = Aᵀ Qb
    Bs = torch.div(Bt, sc, out=scratch("rsvd.Z", (B, w, kp), dt, X.device))
    # Qbᵀ A Aᵀ Qb / sc², its eigh in dt: the Gram is summed in dt (float64 bought nothing but time)
    V = torch.linalg.eigh(Bs.mT @ Bs).eigenvectors[..., kp - k:].flip(-1)   # top-k Ritz vectors
    L = (Qb @ V).to(X.dtype)                                   # [B, s, k] orthonormal
    R = (Bt @ V).to(X.dtype)                                   # [B, w, k] = Aᵀ L
    return (L, R) if wide else (R, L)
