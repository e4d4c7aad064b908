"""Per-layer records of per-example gradients: what they hold, how two of them contract (over
the ops), and how one is encoded into a store's tensors.

A *record* holds one part (a tracked layer, or a projection of all layers) for B examples:

* :class:`LayerBatch` ``A [B, T, din]``, ``G [B, T, dout]``, ``mask [B, T]``: the factors of
  ``D_n = G_nᵀ A_n`` (capture's output);
* :class:`DenseLayer` ``D [B, dout, din]``: materialised gradients;
* :class:`Projected` ``X [B, K]``: projected gradients;
* :class:`Eigen` ``X [B, dout, din]`` with ``Q_A``, ``Q_S``: matrices in a Kronecker eigenbasis,
  standing for ``Q_S X Q_Aᵀ`` (EK-FAC's preconditioned queries, never rotated back unless that
  is cheaper).

:func:`score` computes ``⟨D_q, D_n⟩_F`` for a train record against a :class:`Query` (a record of
Q queries), whichever the two record types. Data flows method → scoring → store → layers → ops:
this module imports only the ops.
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F

from .ops import _common as c
from .ops import flops as _op_flops
from .ops.score_dense import D_TILE, score_dense
from .ops.score_factored import score_factored


class _Tokens:
    """Sizes of a record of tokens ``A [B, T, din]``, ``G [B, T, dout]``."""
    A: torch.Tensor
    G: torch.Tensor

    @property
    def din(self) -> int:
        return self.A.shape[-1]

    @property
    def dout(self) -> int:
        return self.G.shape[-1]

    def __len__(self) -> int:
        return self.A.shape[0]


@dataclass
class LayerBatch(_Tokens):
    """Factors of one tracked layer for one batch."""
    A: torch.Tensor                      # [B, T, din]  layer inputs (bias column appended)
    G: torch.Tensor                      # [B, T, dout] gradients w.r.t. the layer outputs
    mask: Optional[torch.Tensor] = None  # [B, T] bool, False for excluded (padding) tokens

    def to(self, dtype: torch.dtype) -> "LayerBatch":
        return LayerBatch(self.A.detach().to(dtype), self.G.detach().to(dtype), self.mask)

    def dense(self) -> torch.Tensor:
        """``D [B, dout, din] = G_nᵀ A_n`` (excluded tokens contribute nothing)."""
        return torch.bmm(c.mask_rows(self.G.detach(), self.mask).transpose(1, 2),
                         c.mask_rows(self.A.detach(), self.mask))

    def max_tokens(self) -> int:
        return self.A.shape[1] if self.mask is None else int(self.mask.sum(1).max())


@dataclass
class DenseLayer:
    """Materialised per-example gradients ``D [B, dout, din]`` of one layer."""
    D: torch.Tensor

    def __len__(self) -> int:
        return self.D.shape[0]


@dataclass
class Projected:
    """Projected per-example gradients ``X [B, K]``."""
    X: torch.Tensor

    def __len__(self) -> int:
        return self.X.shape[0]


@dataclass
class Eigen:
    """Matrices ``X [B, dout, din]`` in the eigenbasis ``(Q_S, Q_A)``: the record stands for
    ``M = Q_S X Q_Aᵀ``. Against factors, ``⟨M, G_nᵀA_n⟩ = ⟨X, (G_n Q_S)ᵀ(A_n Q_A)⟩``: the train
    tokens are rotated once per train batch (shared by every query) and ``X`` is never rotated
    back (see :meth:`Query._eigen_rotates_train` for when rotating back is cheaper)."""
    X: torch.Tensor    # [B, dout, din]
    QA: torch.Tensor   # [din, din] eigenvectors (columns)
    QS: torch.Tensor   # [dout, dout]

    def __len__(self) -> int:
        return self.X.shape[0]

    def dense(self) -> torch.Tensor:
        """``[B, dout, din] Q_S X Q_Aᵀ`` (``2·B·dout·din·(din + dout)`` FLOPs)."""
        return self.QS @ self.X @ self.QA.T


@dataclass
class EigenTokens(_Tokens):
    """EK-FAC's exact preconditioned queries kept as rotated tokens: ``A = A_q Q_A [B, T, din]``,
    ``G = G_q Q_S [B, T, dout]`` (rows of excluded tokens 0) and the layer's eigenvalues
    ``lam [dout, din]`` and ``damping``, standing for ``M = Q_S X Q_Aᵀ`` with
    ``X = (Gᵀ A) ⊘ (lam + damping)``. The same exact scores as :class:`Eigen` in
    ``T·(din + dout)`` numbers per query instead of ``din·dout``; ``X`` is rebuilt per train tile
    in query chunks (``2·B·T·din·dout`` FLOPs, :meth:`eigen`), never kept."""
    A: torch.Tensor
    G: torch.Tensor
    lam: torch.Tensor
    damping: float
    QA: torch.Tensor
    QS: torch.Tensor

    mask = None          # rotated padding rows are 0: no mask (a record field of LayerBatch)

    def dense_bytes(self) -> int:
        """Bytes per query of the :class:`Eigen` form of this record."""
        return self.din * self.dout * self.A.element_size()

    def eigen(self, q0: int = 0, q1: Optional[int] = None, out: Optional[torch.Tensor] = None,
              e0: int = 0, e1: Optional[int] = None) -> torch.Tensor:
        """``X [q1 - q0, e1 - e0, din]``: rows ``[e0, e1)`` of queries ``[q0, q1)`` (into
        ``out`` if given)."""
        G, A = self.G[q0:q1, :, e0:e1], self.A[q0:q1]
        X = torch.bmm(G.transpose(1, 2), A, out=out)
        return X.mul_((self.lam[e0:e1].to(X.dtype) + self.damping).reciprocal_())  # mul, not div:
        #                                                       the [e, din] reciprocal is small

    def to_eigen(self) -> Eigen:
        """The :class:`Eigen` record of the same queries (``[B, dout, din]``, kept)."""
        return Eigen(self.eigen().contiguous(), self.QA, self.QS)

    def chunks(self, dtype: torch.dtype):
        """``(q0, X [q, dout, din])`` in ``dtype`` over the queries, in query chunks bounded by the
        workspace (each chunk a scratch tile, valid until the next one is asked for)."""
        per = self.dout * self.din * torch.empty((), dtype=dtype).element_size()
        qc = c.chunk(len(self), per)
        for q0 in range(0, len(self), qc):
            q1 = min(len(self), q0 + qc)
            buf = c.scratch("layers.eigen_tokens", (q1 - q0, self.dout, self.din), dtype,
                            self.A.device)
            if self.A.dtype == dtype:
                yield q0, self.eigen(q0, q1, out=buf)
            else:
                yield q0, buf.copy_(self.eigen(q0, q1))


Record = Union[LayerBatch, DenseLayer, Projected, Eigen, EigenTokens]


def _cat_factors(records: List[Union[LayerBatch, EigenTokens]], alloc=None
                 ) -> Union[LayerBatch, EigenTokens]:
    """The records (consumed: the list is emptied) joined along the examples, tokens padded to
    the longest. Each batch's record is copied into the joined buffers and dropped at once, so
    the part is held once plus one batch, not twice; ``alloc(shape, dtype, device)``: where the
    buffers come from (an :class:`Arena`'s, None: fresh)."""
    tokens = isinstance(records[0], EigenTokens)
    if len(records) == 1:
        r = records.pop()
        if tokens:
            return dataclasses.replace(r, A=r.A.contiguous(), G=r.G.contiguous())
        return LayerBatch(r.A.contiguous(), r.G.contiguous(), r.mask)
    A0, G0 = records[0].A, records[0].G
    rest = {f.name: getattr(records[0], f.name) for f in dataclasses.fields(records[0])
            if f.name not in ("A", "G", "mask")}         # EigenTokens' eigenbasis
    S = max(r.A.shape[1] for r in records)
    n = sum(r.A.shape[0] for r in records)
    masked = not tokens and any(r.mask is not None or r.A.shape[1] != S for r in records)
    alloc = alloc or (lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    A = alloc((n, S, A0.shape[2]), A0.dtype, A0.device)
    G = alloc((n, S, G0.shape[2]), G0.dtype, G0.device)
    mask = torch.zeros(n, S, dtype=torch.bool, device=A0.device) if masked else None
    del A0, G0
    o = 0
    with torch.no_grad():
        while records:
            r = records.pop(0)
            b, t = r.A.shape[:2]
            A[o:o + b, :t].copy_(r.A)
            G[o:o + b, :t].copy_(r.G)
            if t < S:        # padding rows: 0 (rotated excluded tokens are 0 too) and masked
                A[o:o + b, t:].zero_()
                G[o:o + b, t:].zero_()
            if mask is not None:
                mask[o:o + b, :t] = True if r.mask is None else r.mask
            o += b
            del r
    if tokens:          # padding rows are 0 like the rotated excluded tokens: no mask
        return EigenTokens(A, G, **rest)
    return LayerBatch(A, G, mask)


class Arena:
    """One block of memory reused for the query-state buffers of consecutive query batches
    (or groups of layers), each released before the next is computed: a fresh allocation of
    hundreds of MB pays its page faults again every time (1.5 s of a 16 s exact pairwise on
    the d=256 transformer's 13 groups). :meth:`reset` starts the next batch; the block is
    reused only if every tensor handed out since the last reset is gone (else a new block is
    allocated: a state still held is never overwritten), and grown to the most a batch took."""

    ALIGN = 64

    def __init__(self):
        self.mem: Optional[torch.Tensor] = None
        self.off, self.need = 0, 0
        self.handed: list = []

    def reset(self) -> None:
        self.need = max(self.need, self.off)
        if any(w() is not None for w in self.handed) or (
                self.mem is not None and self.mem.numel() < self.need):
            self.mem = None
        self.handed, self.off = [], 0

    def take(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= int(d)
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        dev = torch.device(device)
        if self.mem is not None and self.mem.device != dev:
            self.mem = None
        if self.mem is None and self.need and self.off == 0:
            self.mem = torch.empty(self.need, dtype=torch.uint8, device=dev)
        if self.mem is not None and self.off + size <= self.mem.numel():
            t = self.mem[self.off:self.off + nbytes].view(dtype).view(tuple(shape))
        else:
            t = torch.empty(tuple(shape), dtype=dtype, device=dev)
        self.off += size
        self.handed.append(weakref.ref(t))
        return t


class RecordStack:
    """One record of ``n`` examples assembled from per-batch records added in order. Records
    with an example axis of fixed shape (:class:`DenseLayer`, :class:`Eigen`,
    :class:`Projected`) are written into one buffer allocated at the first batch, so the
    ``[n, dout, din]`` whole is never copied or concatenated (a first batch holding all ``n``
    examples is kept as it is); token factors (:class:`LayerBatch`, whose token count differs
    per batch, ``n·T·(din + dout)`` numbers) are padded and concatenated at the end."""

    def __init__(self, n: int, arena: Optional["Arena"] = None):
        self.n, self.off = n, 0
        self.rec: Optional[Record] = None
        self.factors: List[LayerBatch] = []
        self._buf: Optional[torch.Tensor] = None      # or (A, G) of token records
        self._meta: Optional[EigenTokens] = None       # the last token record written there
        self._arena = arena

    def _alloc(self, shape, dtype, device) -> torch.Tensor:
        shape = (self.n,) + tuple(shape)
        if self._arena is not None:
            return self._arena.take(shape, dtype, device)
        return torch.empty(shape, dtype=dtype, device=device)

    def reserve(self, b: int, shape, dtype: torch.dtype, device) -> Optional[torch.Tensor]:
        """The rows ``[off, off + b)`` of the buffer, ``[b, *shape]``, for a producer to write
        its next record's tensor into (then :meth:`add` copies nothing); None where the buffer
        has another shape or dtype."""
        if self.off + b > self.n or self.factors or isinstance(self._buf, tuple):
            return None
        if self._buf is None:
            if self.rec is not None:
                return None
            self._buf = self._alloc(shape, dtype, device)
        if tuple(self._buf.shape[1:]) != tuple(shape) or self._buf.dtype != dtype:
            return None
        return self._buf[self.off:self.off + b]

    def reserve_tokens(self, b: int, T: int, din: int, dout: int, dtype: torch.dtype, device):
        """``(A [b, T, din], G [b, T, dout])``: the rows ``[off, off + b)`` of the token buffers of
        :class:`EigenTokens` records, for the producer to write its next record's rotated tokens
        into (allocated at the first batch, from the arena if any), or None where they do not
        fit (another token count: the records are then padded and joined at the end)."""
        if self.off + b > self.n or self.factors or self.rec is not None:
            return None
        if self._buf is None:
            self._buf = (self._alloc((T, din), dtype, device), self._alloc((T, dout), dtype, device))
        A, G = self._buf if isinstance(self._buf, tuple) else (None, None)
        if A is None or A.shape[1:] != (T, din) or G.shape[2] != dout or A.dtype != dtype:
            return None
        return A[self.off:self.off + b], G[self.off:self.off + b]

    def add(self, r: Record) -> None:
        b = len(r)
        if self.off + b > self.n:
            raise ValueError(f"RecordStack: {self.off + b} examples added, {self.n} expected")
        if isinstance(r, EigenTokens) and self._buf is None and not self.factors and b < self.n:
            self._buf = (self._alloc(r.A.shape[1:], r.A.dtype, r.A.device),     # a first batch
                         self._alloc(r.G.shape[1:], r.G.dtype, r.G.device))     # made elsewhere
        if isinstance(r, EigenTokens) and isinstance(self._buf, tuple) and not self.factors:
            A, G = (t[self.off:self.off + b] for t in self._buf)
            if r.A.shape == A.shape and r.G.shape == G.shape and r.A.dtype == A.dtype:
                with torch.no_grad():          # else written there (reserve_tokens)
                    for t, dst in ((r.A, A), (r.G, G)):
                        if t.data_ptr() != dst.data_ptr():
                            dst.copy_(t)
                self._meta = dataclasses.replace(r, A=None, G=None)
                self.off += b
                return
            # another token count: the rows so far become the first of the joined records
            if self.off:
                self.factors.append(dataclasses.replace(r, A=self._buf[0][:self.off],
                                                        G=self._buf[1][:self.off]))
            self._buf = None
        if isinstance(r, (LayerBatch, EigenTokens)):
            self.factors.append(r)
        elif self.rec is None and b == self.n and self._buf is None:
            self.rec = r
        else:
            f = "D" if isinstance(r, DenseLayer) else "X"
            t = getattr(r, f)
            if self.rec is None:
                if self._buf is None:
                    self._buf = self._alloc(t.shape[1:], t.dtype, t.device)
                buf = self._buf
                self.rec = DenseLayer(buf) if f == "D" else Projected(buf) \
                    if isinstance(r, Projected) else Eigen(buf, r.QA, r.QS)
            dst = getattr(self.rec, f)[self.off:self.off + b]
            if t.data_ptr() != dst.data_ptr() or t.shape != dst.shape:    # else written there
                with torch.no_grad():
                    dst.copy_(t)
        self.off += b

    def result(self) -> Record:
        if self.off != self.n:
            raise ValueError(f"RecordStack: {self.off} examples added, {self.n} expected")
        if self.factors:    # concatenated once; the batches' records are dropped here, not
            # when the stack goes (they would double the query state while it is scored)
            alloc = None if self._arena is None else \
                (lambda shape, dtype, device: self._arena.take(shape, dtype, device))
            self.rec = _cat_factors(self.factors, alloc)
        elif isinstance(self._buf, tuple):
            self.rec = dataclasses.replace(self._meta, A=self._buf[0], G=self._buf[1])
            self._buf = self._meta = None
        return self.rec


# --------------------------------------------------------------------------- scoring
def op_flops(op: str, **dims) -> float:
    """FLOPs of ``op``'s cheapest contraction order for these sizes (the ops' cost model).
    The one place this module reads the cost model."""
    return min(_op_flops(op, **dims).values())


class Query:
    """The query side of one part: a record of Q queries and how it is scored.

    Dense and eigenbasis queries keep one ``[Q, dout, din]`` form (an ``Eigen`` record rotated
    back replaces its ``X``: no growth). Factor queries (TracIn's query tokens, EK-FAC's rank-r
    factors) hold ``Q·S·(din + dout)`` numbers; scoring them through their dense form
    ``D_q = U_qᵀ V_q`` is decided by FLOPs at the first train batch, counting the rebuild, and the
    dense form is then rebuilt per train batch in query chunks bounded by the workspace and
    dropped: the query side never grows to ``Q·dout·din`` (rank-r is a memory tool)."""

    def __init__(self, rec: Record):
        self.rec = rec
        self._dense: Optional[torch.Tensor] = None
        self.use_dense: Optional[bool] = None
        self.rotated_flops = 0.0   # Eigen: FLOPs spent so far rotating train tokens

    def __len__(self) -> int:
        return len(self.rec)

    def dense(self) -> torch.Tensor:
        """``[Q, dout, din]``."""
        if self._dense is None:
            self._dense = self.rec.D if isinstance(self.rec, DenseLayer) else \
                self.rec.dense().contiguous()
            if isinstance(self.rec, Eigen):   # rotated back: X is no longer needed
                self.rec = DenseLayer(self._dense)
        return self._dense

    def _prefer_dense(self, train: LayerBatch) -> bool:
        if self.use_dense is None:
            # score_factored against the query factors vs score_dense against D_q = U_qᵀ V_q
            # rebuilt for this train batch (2·Q·S·dout·din FLOPs, not kept)
            N, T, din = train.A.shape
            Q, S, dout = self.rec.G.shape
            f_fact = op_flops("score_factored", N=N, T=T, Q=Q, S=S, din=din, dout=dout)
            f_dense = (op_flops("score_dense", N=N, T=T, Q=Q, din=din, dout=dout)
                       + 2.0 * Q * S * dout * din)
            self.use_dense = f_dense < f_fact
        return self.use_dense

    def dense_chunks(self):
        """``(q0, D [q, dout, din])`` over the queries: the kept dense form in one piece, or a
        factor record's dense form rebuilt in workspace-sized query chunks (not kept)."""
        r = self.rec
        if isinstance(r, EigenTokens):      # rotated back chunk by chunk
            for q0, X in r.chunks(r.A.dtype):
                yield q0, r.QS @ X @ r.QA.T
            return
        if not isinstance(r, LayerBatch):
            yield 0, self.dense()
            return
        qc = c.chunk(len(r), r.dout * r.din * r.G.element_size())
        for q0 in range(0, len(r), qc):
            m = None if r.mask is None else r.mask[q0:q0 + qc]
            yield q0, LayerBatch(r.A[q0:q0 + qc], r.G[q0:q0 + qc], m).dense()


    def _eigen_rotates_train(self, train: LayerBatch) -> bool:
        """Eigen queries against a factor train batch: rotate the batch's tokens into the
        eigenbasis (``2·B·T·(din² + dout²)`` FLOPs per batch) or rotate the queries back once
        (``2·Q·dout·din·(din + dout)``, then free for every later batch)? The total train size
        is unknown here, so: rotate tokens while the FLOPs spent on that stay within the one-off
        cost of rotating back, then rotate back (at most 2× the better choice in hindsight)."""
        if self._dense is not None:
            return False
        B, T, din = train.A.shape
        dout = train.G.shape[2]
        per_batch = 2.0 * B * T * (din * din + dout * dout)
        back = 2.0 * len(self.rec) * dout * din * (din + dout)
        if self.rotated_flops + per_batch <= back:
            self.rotated_flops += per_batch
            return True
        return False


def score(train: Record, q: Query, dtype: torch.dtype, backend: Optional[str] = None,
          per_token: bool = False) -> torch.Tensor:
    """``[B, Q]`` ``⟨D_q, D_n⟩_F`` of a train record against the queries, computed in ``dtype``;
    ``per_token=True``: ``[B, Q, T]`` the terms of that sum per train token (see
    :func:`score_tokens`)."""
    r = q.rec
    if per_token:
        return score_tokens(train, q, dtype)
    if isinstance(r, Projected):
        return train.X.to(dtype) @ r.X.to(dtype).T
    if isinstance(r, EigenTokens):
        return _score_eigen_tokens(train, r, dtype, backend)
    if isinstance(train, DenseLayer):
        D = train.D.to(dtype).flatten(1)
        return torch.cat([D @ Dq.to(dtype).flatten(1).T for _, Dq in q.dense_chunks()], 1)
    A, G = train.A.detach().to(dtype), train.G.detach().to(dtype)
    if isinstance(r, Eigen) and q._eigen_rotates_train(train):
        # rotated tokens with their masked rows 0: no mask (and no masked copy) for the op
        At, Gt = c.rotate_tokens(A, G, r.QA.to(dtype), r.QS.to(dtype), train.mask)
        s = score_dense(At, Gt, r.X.to(dtype), backend=backend)
    elif isinstance(r, LayerBatch) and not q._prefer_dense(train):
        s = score_factored(A, G, r.A, r.G, a_mask=train.mask, v_mask=r.mask, backend=backend)
    else:
        s = torch.cat([score_dense(A, G, Dq.to(A.dtype), a_mask=train.mask, backend=backend)
                       .to(dtype) for _, Dq in q.dense_chunks()], 1)
    return s.to(dtype)


def _score_eigen_tokens(train: Record, r: EigenTokens, dtype: torch.dtype,
                        backend: Optional[str]) -> torch.Tensor:
    """``[B, Q]`` against :class:`EigenTokens` queries: the train side rotated into the
    eigenbasis once (tokens, or a dense gradient ``Q_Sᵀ D_n Q_A``), then, a chunk of rows at a
    time, the train gradients' rows ``D'_n[e0:e1]`` and the queries' ``X_q[e0:e1]`` rebuilt
    from their tokens side by side and contracted by one GEMM (``score_dense``'s materialize
    order with ``X`` built as it is read): the chunks stay cache-sized (``D_TILE`` on the
    CPU) and ``X`` is never whole. ``2·dout·din·(B·T + Q·S + B·Q)`` FLOPs."""
    QA, QS = r.QA.to(dtype), r.QS.to(dtype)
    B, Q = len(train), len(r)
    out = torch.zeros(B, Q, dtype=dtype, device=QA.device)
    if B == 0 or Q == 0:
        return out
    dout, din = r.dout, r.din
    if r.A.dtype != dtype:
        r = dataclasses.replace(r, A=r.A.to(dtype), G=r.G.to(dtype))
    if isinstance(train, DenseLayer):
        R = QS.T @ train.D.to(dtype) @ QA

        def rows(e0, e1, _):
            return R[:, e0:e1]
    else:
        # the tile's layer rotated whole, kept rows only (rotate_rows): a chunk of G's columns
        # at a time held one copy less but took ~1.5 s more of Llama's exact pairwise
        At, Gt = c.rotate_tokens(train.A.detach().to(dtype), train.G.detach().to(dtype), QA, QS,
                                 train.mask)

        def rows(e0, e1, buf):
            return torch.bmm(Gt[:, :, e0:e1].transpose(1, 2), At, out=buf)
    row = din * torch.empty((), dtype=dtype).element_size()      # one row of one matrix
    ws = min(c.workspace_bytes(), D_TILE) if QA.device.type == "cpu" else c.workspace_bytes()
    ec = max(1, min(dout, ws // ((B + Q) * row)))
    ec = -(-dout // -(-dout // ec))                                 # evened out
    for e0 in range(0, dout, ec):
        e1 = min(dout, e0 + ec)
        D = rows(e0, e1, c.scratch("layers.eigen_tokens.D", (B, e1 - e0, din), dtype, QA.device))
        X = r.eigen(out=c.scratch("layers.eigen_tokens.X", (Q, e1 - e0, din), dtype, QA.device),
                    e0=e0, e1=e1)
        out.addmm_(D.flatten(1), X.flatten(1).T)
    return out


def score_tokens(train: Record, q: Query, dtype: torch.dtype) -> torch.Tensor:
    """``[B, Q, T]`` per-token scores ``g_{n,t}ᵀ M_q a_{n,t}`` (``M_q`` the query's dense form),
    or ``Σ_s (a_{n,t}·v_{q,s})(g_{n,t}·u_{q,s})`` against factor queries; masked tokens are 0 and
    the sum over T is :func:`score`. Plain torch on example tiles bounded by the workspace (the
    ops have no per-token variant yet). Only factor train records hold tokens."""
    if not isinstance(train, LayerBatch):
        what = ("a dense per-example gradient (a store with layout 'dense' for this layer)"
                if isinstance(train, DenseLayer) else "a projected gradient (a projection)")
        raise ValueError(f"per_token=True needs the train side's token factors, but the record is "
                         f"{what}; use data, or a store built with layout='factors' and no "
                         "projection")
    if isinstance(q.rec, Projected):
        raise ValueError("per_token=True needs per-layer query records, not a projection")
    if isinstance(q.rec, EigenTokens):      # in the eigenbasis: M_q = Q_S X_q Q_Aᵀ
        A, G = c.rotate_tokens(train.A.detach().to(dtype), train.G.detach().to(dtype),
                               q.rec.QA.to(dtype), q.rec.QS.to(dtype), train.mask)
    else:
        A = c.mask_rows(train.A.detach().to(dtype), train.mask)
        G = c.mask_rows(train.G.detach().to(dtype), train.mask)
    B, T, din = A.shape
    dout = G.shape[2]
    factors = isinstance(q.rec, LayerBatch) and not q._prefer_dense(train)
    if factors:
        V = c.mask_rows(q.rec.A.to(dtype), q.rec.mask)          # [Q, S, din]
        U = c.mask_rows(q.rec.G.to(dtype), q.rec.mask)          # [Q, S, dout]
        Q, S = V.shape[:2]
        per = 2 * T * Q * S
    else:
        Q = len(q)
        per = T * Q * dout
    out = torch.empty(B, Q, T, dtype=dtype, device=A.device)
    nb = c.chunk(B, per * torch.finfo(dtype).bits // 8)
    if factors:
        for b0 in range(0, B, nb):
            ka = torch.einsum("btd,qsd->bqts", A[b0:b0 + nb], V)
            kg = torch.einsum("bte,qse->bqts", G[b0:b0 + nb], U)
            out[b0:b0 + nb] = (ka * kg).sum(3)
        return out
    chunks = q.rec.chunks(dtype) if isinstance(q.rec, EigenTokens) else q.dense_chunks()
    for q0, M in chunks:                                        # [q, dout, din]
        M = M.to(dtype)
        for b0 in range(0, B, nb):
            Ma = torch.einsum("qed,btd->bqte", M, A[b0:b0 + nb])  # M_q a_t
            out[b0:b0 + nb, q0:q0 + M.shape[0]] = (Ma * G[b0:b0 + nb, None]).sum(3)
    return out


# --------------------------------------------------------------------------- encoding
def pack_factors(lb: LayerBatch, dtype: torch.dtype):
    """``(A_flat [ntok, din], G_flat [ntok, dout], offsets [B+1], positions [ntok], lengths [B])``,
    masked tokens dropped; ``positions`` (int32) is each kept token's index in its example and
    ``lengths`` (int32) the examples' token count before masking (what per-token scores need)."""
    B, T, _ = lb.A.shape
    keep = torch.ones(B, T, dtype=torch.bool, device=lb.A.device) if lb.mask is None else lb.mask
    keep = keep.cpu()
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(keep.sum(1).to(torch.int64), 0)
    pos = torch.arange(T, dtype=torch.int32).expand(B, T)[keep].contiguous()
    lengths = torch.full((B,), T, dtype=torch.int32)
    keep = keep.to(lb.A.device)
    return (lb.A.detach()[keep].to(dtype).cpu(), lb.G.detach()[keep].to(dtype).cpu(), offsets,
            pos, lengths)


def unpack_factors(A: torch.Tensor, G: torch.Tensor, offsets: torch.Tensor, device,
                   positions: Optional[torch.Tensor] = None,
                   lengths: Optional[torch.Tensor] = None) -> LayerBatch:
    """Padded ``LayerBatch`` ``[B, Tmax, ·]`` (mask None when every example has Tmax tokens);
    with ``positions`` and ``lengths`` the tokens go back to their places ``[B, max length, ·]``
    (masked tokens zero, as captured)."""
    counts = offsets[1:] - offsets[:-1]
    B = counts.numel()
    if positions is not None:
        Tm = int(lengths.max()) if B else 0
        mask = torch.zeros(B, Tm, dtype=torch.bool)
        mask[torch.repeat_interleave(torch.arange(B), counts), positions.long()] = True
    else:
        Tm = int(counts.max()) if B else 0
        if B and bool((counts == Tm).all()):
            return LayerBatch(A.reshape(B, Tm, -1).to(device), G.reshape(B, Tm, -1).to(device),
                              None)
        mask = torch.arange(Tm)[None, :] < counts[:, None]
    Ap = A.new_zeros(B, Tm, A.shape[1])
    Gp = G.new_zeros(B, Tm, G.shape[1])
    Ap[mask] = A
    Gp[mask] = G
    return LayerBatch(Ap.to(device), Gp.to(device), mask.to(device))


def choose_layouts(records: Dict[str, Record]) -> Dict[str, str]:
    """Per factor record: ``"factors"`` where ``T·(din+dout) < din·dout`` (T = most tokens of an
    example), else ``"dense"``. Other records have one layout and no entry."""
    return {name: "factors" if lb.max_tokens() * (lb.din + lb.dout) < lb.din * lb.dout
            else "dense" for name, lb in records.items() if isinstance(lb, LayerBatch)}


def encode(prefix: str, records: Dict[str, Record], layouts: Dict[str, str],
           dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The tensors of a store shard for ``records``: ``<prefix>/<part>/A``, ``/G``, ``/offsets``
    (factors), ``<prefix>/<part>/D`` (dense) or ``<prefix>/<part>`` (projected, float32)."""
    out = {}
    for part, rec in records.items():
        key = f"{prefix}/{part}"
        if isinstance(rec, Projected):
            out[key] = rec.X.detach().float().cpu()
        elif layouts[part] == "factors":
            (out[f"{key}/A"], out[f"{key}/G"], out[f"{key}/offsets"], out[f"{key}/positions"],
             out[f"{key}/lengths"]) = pack_factors(rec, dtype)
        else:
            out[f"{key}/D"] = rec.dense().to(dtype).cpu()
    return out


def decode(tensors: Dict[str, torch.Tensor], prefix: str, names, layouts: Dict[str, str],
           device, tokens: bool = False) -> Dict[str, Record]:
    """Inverse of :func:`encode`: ``{"proj": Projected}`` where the shard holds ``<prefix>/proj``,
    else ``{name: LayerBatch | DenseLayer}`` for ``names`` (in that order). ``tokens=True``
    puts factor tokens back at their positions (for per-token scores; ValueError for a store
    written before positions were kept)."""
    if f"{prefix}/proj" in tensors:
        return {"proj": Projected(tensors[f"{prefix}/proj"].to(device))}
    out = {}
    for n in names:
        key = f"{prefix}/{n}"
        if layouts[n] == "factors":
            pos = lengths = None
            if tokens:
                if f"{key}/positions" not in tensors:
                    raise ValueError(f"per_token=True: the store does not hold the token positions "
                                     f"of layer {n!r} (it was built by an older fastinf); rebuild "
                                     "it to get per-token scores")
                pos, lengths = tensors[f"{key}/positions"], tensors[f"{key}/lengths"]
            out[n] = unpack_factors(tensors[f"{key}/A"], tensors[f"{key}/G"],
                                    tensors[f"{key}/offsets"], device, pos, lengths)
        else:
            out[n] = DenseLayer(tensors[f"{key}/D"].to(device))
    return out


def cat_parts(parts: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Concatenates the per-batch encodings of one shard (offsets are re-based)."""
    out: Dict[str, List[torch.Tensor]] = {}
    for p in parts:
        for k, v in p.items():
            out.setdefault(k, []).append(v)
    res = {}
    for k, vs in out.items():
        if k.endswith("/offsets"):
            acc, base = [vs[0]], int(vs[0][-1])
            for v in vs[1:]:
                acc.append(v[1:] + base)
                base += int(v[-1])
            res[k] = torch.cat(acc).contiguous()
        else:
            res[k] = torch.cat(vs, 0).contiguous()
    return res
