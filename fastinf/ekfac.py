"""EK-FAC influence functions (Kronfluence conventions), over the fused ops.

Per tracked layer:

* ``A = E[a aᵀ]`` and ``S = E[g gᵀ]``, averaged over (unmasked) tokens, eigendecomposed in float64;
* eigenvalue correction ``Λ = mean_n (Q_Sᵀ D_n Q_A)^∘2`` over examples (op ``ekfac_lambda``);
* ``H⁻¹D = Q_S [(Q_Sᵀ D Q_A) ⊘ (Λ + λ)] Q_Aᵀ``, ``λ = 0.1·mean(Λ)`` per layer unless given;
* ``score(q, n) = Σ_layers ⟨H⁻¹D_q, D_n⟩`` (positive = training example n lowers the query's
  measurement, as Kronfluence), ``self(n) = Σ_layers ⟨H⁻¹D_n, D_n⟩``; not divided by n_train.

Cost (per example, one layer; "rotate tokens, not gradients", DESIGN §1). ``Q_Sᵀ D Q_A`` is taken
from rotated tokens, ``(G Q_S)ᵀ(A Q_A)``: ``2·T·(din² + dout² + din·dout)`` FLOPs, where
``T·(din² + dout²) <= dout·din·(din + dout)``, else by rotating the dense ``D``
(:meth:`EKFAC.rotates_tokens`; queries, self-scores; the Λ pass's op ``ekfac_lambda`` applies
the same rule). The preconditioned query ``X_q = (Q_SᵀD_qQ_A) ⊘ (Λ+λ)`` stays in the eigenbasis
(:class:`fastinf.layers.Eigen`): each train batch's tokens are rotated once for all queries and
``X_q`` is never rotated back, until rotating train tokens has cost as much as rotating the
queries back once (``2·Q·dout·din·(din + dout)``). For T=48 and the layers of a d=256
transformer (din, dout with the bias column: 257→256, 257→1024, 1025→256, 257→384) the token
order needs 3.9×, 5.3×, 5.3×, 4.5× fewer FLOPs than the dense rotation, and the eigenbasis saves
rotating back (as much again) while ``N_train·T·(din² + dout²) < Q·dout·din·(din + dout)``;
bench/e2e/ekfac_cost.py measures it (bench/results/ekfac_cost.csv).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections import OrderedDict
from typing import Callable, Dict, Optional

import torch
from torch import nn

from . import distributed as dist
from . import scoring
from ._pass import factor_pass, model_device
from .capture import NonFiniteError, layer_shape, tracked_modules, tracking_summary
from .layers import DenseLayer, Eigen, EigenTokens, LayerBatch
from .ops import _common as c
from .ops.ekfac_lambda import ekfac_lambda, kept_index, take_rows
from .store import hash_state

log = logging.getLogger("fastinf")

FORMAT = "fastinf.ekfac"
VERSION = 1
_OUT = "leave the layer out with modules=[...] (the tracked modules except it)"


def _eigh(name, which, C, n, xmax, dtype=torch.float64):
    """Eigendecomposition (in ``dtype``) of the summed covariance ``C`` of ``n`` tokens, as
    ``(float64 eigenvalues, eigenvectors in dtype)``; an overflow (Inf/NaN) or a failed eigh is
    an error naming the layer and the cause."""
    if not bool(torch.isfinite(C).all()):
        raise NonFiniteError(
            f"EK-FAC: the {which} covariance of layer {name!r} overflows in {C.dtype}: its "
            f"{which}s reach |x| = {xmax:.3g}, and their squares summed over tokens exceed "
            f"{torch.finfo(C.dtype).max:.3g}; scale the inputs or weights down, use a float64 "
            f"model, or {_OUT}")
    try:
        e, Q = torch.linalg.eigh(C.to(dtype) / n, UPLO="L")   # _add_gram fills the lower triangle
        return e.double(), Q
    except torch.linalg.LinAlgError as exc:
        raise ValueError(f"EK-FAC: the eigendecomposition of the {which} covariance of layer "
                         f"{name!r} failed ({exc}); largest |{which}| = {xmax:.3g}; {_OUT}"
                         ) from exc


def _add_gram(C, X, blocks: int = 4):
    """``C += XᵀX`` in its lower triangle (what eigh reads): block columns of ``C`` from the
    diagonal block down (the blocks above are left as they were), ~5/8 of the full GEMM's FLOPs
    for 4 blocks. Narrow covariances (< 256) take the full GEMM. 1536 tokens, 2 threads: 0.75
    against 0.99 ms at d = 256, 1.46 against 2.13 at 384, 4.7 against 6.7 at 688."""
    d = X.shape[1]
    if d < 256:
        return C.addmm_(X.T, X)
    bs = -(-d // blocks)
    for i in range(0, d, bs):
        C[i:, i:i + bs].addmm_(X[:, i:].T, X[:, i:i + bs])
    return C


def _input_key(lb: LayerBatch):
    """Identifies a layer's captured input: layers fed one tensor (an attention's q, k and v,
    an MLP's gate and up projections) share its (masked) form, the same memory."""
    A = lb.A
    return (A.data_ptr(), tuple(A.shape), A.stride(), A.dtype, A.device)


def _kept_rows(factors) -> dict:
    """``{name: (A [R, din], G [R, dout], offsets [B + 1])}``: a batch's captured tokens without
    the masked (padding) ones, as :func:`fastinf.ops.ekfac_lambda` takes them with ``offsets=``.
    Layers reading one input (an attention's q, k, v) share one copy of its rows; an unmasked
    batch gives views, not copies. The fit sums its covariances over these rows and keeps them
    for Λ: no FLOPs and no kept bytes for padding."""
    out, shared = {}, {}
    for name, lb in factors.items():
        rows, offs = kept_index(lb.mask, lb.A.shape[0], lb.A.shape[1], lb.A.device)
        key = _input_key(lb)
        hit = shared.get(key)
        if hit is not None and ((hit[0] is None and rows is None) or (
                hit[0] is not None and rows is not None and torch.equal(hit[0], rows))):
            A2 = hit[1]
        else:
            A2 = take_rows(lb.A, rows)
            shared[key] = (rows, A2)
        out[name] = (A2, take_rows(lb.G, rows), offs)
    return out


def _largest_abs(X: torch.Tensor) -> torch.Tensor:
    """Largest ``|x|`` of a non-empty tensor (a 0-dim tensor; no host sync)."""
    return torch.stack(torch.aminmax(X)).abs().max()


def factor_memory(dout: int, din: int, dtype: torch.dtype,
                  eigh_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes one layer's fit needs at its peak: the covariances A ``[din, din]`` and S
    ``[dout, dout]``, the kept eigenvectors Q_A, Q_S and Λ ``[dout, din]`` in ``dtype``, plus
    the eigendecomposition of the larger side (matrix, eigenvectors, LAPACK workspace) in
    ``eigh_dtype`` (None: ``dtype``)."""
    b = torch.finfo(dtype).bits // 8
    return b * (2 * din * din + 2 * dout * dout + dout * din) + _eigh_bytes(
        dout, din, eigh_dtype or dtype)


def _eigh_bytes(dout: int, din: int, dtype: torch.dtype = torch.float64) -> int:
    """Matrix, eigenvectors and LAPACK workspace of the larger covariance, in ``dtype``."""
    return 3 * (torch.finfo(dtype).bits // 8) * max(din, dout) ** 2


def default_factor_budget(device: torch.device) -> float:
    """Half of the device's memory (CUDA: the GPU's, CPU: the physical RAM; 16 GiB if unknown)."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory / 2
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    except (ValueError, OSError, AttributeError, RuntimeError):
        return 16 * 2 ** 30


def _token_budget(token_memory, device) -> float:
    """Bytes of captured tokens ``fit`` keeps for the eigenvalue correction (see ``fit``)."""
    if token_memory is None:
        return min(2.0 * 2 ** 30, default_factor_budget(device) / 4)
    if (isinstance(token_memory, bool) or not isinstance(token_memory, (int, float))
            or not token_memory >= 0):
        raise ValueError("token_memory must be None (the smaller of 2 GiB and an eighth of the "
                         "device's memory) or a number of bytes >= 0 (0: a second pass over "
                         f"every batch), got {token_memory!r}")
    return float(token_memory)


def _held_bytes(rows: dict) -> int:
    """Bytes a kept batch of :func:`_kept_rows` holds alive (whole storages, each once: a view
    keeps its base, layers reading one input share its rows)."""
    seen = {}
    for A, G, offs in rows.values():
        for x in (A, G, offs):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    return sum(seen.values())


def _check_budget(max_factor_memory):
    if max_factor_memory is not None and (
            isinstance(max_factor_memory, bool) or not isinstance(max_factor_memory, (int, float))
            or not max_factor_memory > 0):
        raise ValueError("max_factor_memory must be None (half the device's memory) or a number "
                         f"of bytes > 0 (float('inf'): no limit), got {max_factor_memory!r}")


def _check_denominator(name, L, heuristic, amax=None, gmax=None):
    """``Λ + λ`` must be finite and invertible, else the layer's scores would be NaN/Inf."""
    lam = L["lam"]
    if not bool(torch.isfinite(lam).all()):
        raise NonFiniteError(f"EK-FAC: the eigenvalue correction Λ of layer {name!r} overflows "
                             f"in {lam.dtype}; scale the inputs or weights down, use a float64 "
                             f"model, or {_OUT}")
    if bool(torch.isfinite(1.0 / (lam + L["damping"])).all()):
        return
    if gmax == 0:
        cause = ("its output gradient is exactly zero in every training example (the layer is "
                 "called but its output does not reach the loss, or all its units are dead)")
    elif amax == 0:
        cause = "its inputs are exactly zero in every training example"
    elif amax is not None:
        cause = (f"its curvature underflows in {lam.dtype} (largest |input| {amax:.3g}, largest "
                 f"|output gradient| {gmax:.3g}: Λ falls below {torch.finfo(lam.dtype).tiny:.3g};"
                 " a float64 model avoids that)")
    else:
        cause = "its Λ has zeros"
    how = " (the 0.1·mean(Λ) heuristic)" if heuristic else ""
    raise ValueError(f"EK-FAC: layer {name!r} has Λ + damping = 0 (damping "
                     f"{L['damping']:.3g}{how}) because {cause}; its scores would be NaN. "
                     f"{_OUT[0].upper()}{_OUT[1:]}, or pass damping=<a float > 0> (a damping "
                     "floor for every layer)")


def _rows(rec, n0, n1):
    """Examples ``[n0, n1)`` of a ``LayerBatch`` or ``DenseLayer``."""
    if isinstance(rec, DenseLayer):
        return DenseLayer(rec.D[n0:n1])
    return LayerBatch(rec.A[n0:n1], rec.G[n0:n1], None if rec.mask is None else rec.mask[n0:n1])


class EKFAC:
    """EK-FAC influence of training examples on queries.

    Args:
        model: the trained model (its device and dtype are used; float32/bf16/float64).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-example training losses (summed over
            tokens); differentiated on the training side of the scores.
        modules: names or module objects to track (default every ``nn.Linear``, ``nn.Conv2d``
            with ``groups=1`` and transformers' ``Conv1D`` with a trainable weight; see
            docs/constraints.md). What is tracked is in ``self.tracked_modules``
            (``{name: {"type", "params"}}``) and logged once (logger ``"fastinf"``, INFO).
        damping: None for ``0.1·mean(Λ)`` per layer (Kronfluence's heuristic), or a float λ.
        fisher_loss_fn: the loss the curvature is fitted on (default ``loss_fn``: empirical Fisher).
        token_mask_fn: ``token_mask_fn(batch) -> [B, T] bool``; False tokens (padding) are
            excluded from the factors and the token counts.
        progress: show a tqdm bar for every pass.
        max_factor_memory: bytes the fit may use for the factors (see :func:`factor_memory`),
            checked per layer and in total before any pass; a layer over it (e.g. an LM head
            with a large vocabulary, ``S`` is ``vocab²``) is an error naming it and the
            ``modules=`` way out. None: half the device's memory; ``float("inf")``: no check.
        eigh_dtype: dtype of the covariances' eigendecompositions. None (default): the factors'
            dtype, float32 for float32/bf16 models (their covariances are summed in float32, so
            a float32 eigh loses nothing they hold, at half the time of float64), float64 for
            float64 models. ``torch.float64`` forces float64 (Kronfluence's default).

    Attributes:
        compact_queries: True (default): where the exact queries' preconditioned gradients do
            not fit the query memory budget densely (``[Q, dout, din]`` per layer), layers with
            few tokens against their width keep them as rotated tokens, ``T·(din + dout)`` per
            query, rebuilt per train tile (:class:`fastinf.layers.EigenTokens`), when that is
            cheaper than the extra passes the dense form needs; same scores. False: always dense.
    """

    force_rotation: Optional[str] = None   # "tokens" / "dense" overrides rotates_tokens' rule

    def __init__(self, model: nn.Module, loss_fn: Callable, *, modules=None,
                 damping: Optional[float] = None, fisher_loss_fn: Optional[Callable] = None,
                 token_mask_fn: Optional[Callable] = None, progress: bool = True,
                 max_factor_memory: Optional[float] = None,
                 eigh_dtype: Optional[torch.dtype] = None):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if damping is not None and (isinstance(damping, bool) or not isinstance(damping, (int, float))
                                    or not math.isfinite(damping) or damping < 0):
            raise ValueError("damping must be None (heuristic) or a finite float >= 0, got "
                             f"{damping!r}")
        _check_budget(max_factor_memory)
        if eigh_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"eigh_dtype must be None (the factors' dtype), torch.float32 or "
                             f"torch.float64, got {eigh_dtype!r}")
        self.eigh_dtype = eigh_dtype
        self.model = model
        self.loss_fn = loss_fn
        self.max_factor_memory = max_factor_memory
        self.modules = tracked_modules(model, modules)
        summary = tracking_summary(model, self.modules)
        self.tracked_modules = summary["tracked"]     # name -> {"type", "params"}
        log.info(summary["line"])
        self.damping = None if damping is None else float(damping)
        self.fisher_loss_fn = fisher_loss_fn or loss_fn
        # errors of the fit passes name the argument the user gave
        self._fisher_arg = "loss_fn" if fisher_loss_fn is None else "fisher_loss_fn"
        self.token_mask_fn = token_mask_fn
        self.progress = progress
        self.factors: Optional[Dict[str, dict]] = None
        self.n_fit = 0
        self._weights_sha256: Optional[str] = None   # of the weights the factors were fitted on
        self.backend: Optional[str] = None   # kernel backend of the ops (None: fastest usable)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the factors and scores: float64 for float64 models, else float32."""
        for p in self.model.parameters():
            if p.dtype == torch.float64:
                return torch.float64
        return torch.float32

    def _pass(self, data, batch_size, loss_fn, desc, what, name, select=None, start=0,
              zero_masked=True):
        return factor_pass(self.model, loss_fn, data, self.modules, batch_size,
                           token_mask_fn=self.token_mask_fn, desc=desc, progress=self.progress,
                           what=what, name=name, select=select, start=start,
                           zero_masked=zero_masked)

    def _require_fit(self, what):
        if self.factors is None:
            raise RuntimeError(f"EKFAC.{what}: the factors are not fitted; call fit(train) or "
                               "EKFAC.load(path, model, loss_fn) first")

    # ------------------------------------------------------------------ fit
    def _check_factor_memory(self, dt, dev):
        budget = self.max_factor_memory
        budget = default_factor_budget(dev) if budget is None else budget
        shapes = {n: layer_shape(m) for n, m in self.modules.items()}
        et = self.eigh_dtype or dt
        need = {n: factor_memory(*shape, dt, et) for n, shape in shapes.items()}
        gib = 2.0 ** 30
        how = ("leave it out with modules=[...] (the tracked modules except it; e.g. an LM head "
               "over a large vocabulary), or raise max_factor_memory (bytes; float('inf'): no "
               "limit)")
        for n, b in need.items():
            if b > budget:
                dout, din = shapes[n]
                raise MemoryError(f"EKFAC.fit: layer {n!r} ({type(self.modules[n]).__name__}, "
                                  f"gradient [{dout}, {din}]) needs about {b / gib:.3g} GiB for "
                                  f"its factors (A {din}x{din}, S {dout}x{dout}, eigenvectors "
                                  f"and Λ in {dt}, {str(et).replace('torch.', '')} eigendecomposition), over "
                                  f"max_factor_memory = {budget / gib:.3g} GiB; {how}")
        # together: every layer's factors, one eigendecomposition at a time
        eig = [_eigh_bytes(*shape, et) for shape in shapes.values()]
        total = sum(need.values()) - sum(eig) + max(eig)
        if total > budget:
            top = sorted(need, key=need.get, reverse=True)[:3]
            raise MemoryError(f"EKFAC.fit: the factors of the {len(need)} tracked layers need "
                              f"about {total / gib:.3g} GiB together, over max_factor_memory = "
                              f"{budget / gib:.3g} GiB (largest: "
                              + ", ".join(f"{n!r} {need[n] / gib:.3g} GiB" for n in top)
                              + "); leave some out with modules=[...], or raise max_factor_memory")

    def fit(self, train, batch_size: int = 64, *,
            token_memory: Optional[float] = None) -> "EKFAC":
        """Covariances -> eigendecompositions (``eigh_dtype``) -> eigenvalue correction Λ.

        The eigenvalue correction needs every example's tokens again, rotated into the new
        eigenbases. The tokens captured by the covariance pass are kept for it (the unmasked
        ones only, as rows: padding costs neither covariance FLOPs nor kept bytes), batch after
        batch, while they fit in ``token_memory`` bytes (None: the smaller of 2 GiB and an
        eighth of the device's memory; 0: keep none); a second forward+backward pass runs only
        over the batches that did not fit (none when all did). The factors are the same either
        way (the same tokens, summed in the same order) for a deterministic ``fisher_loss_fn``;
        one that samples labels (true Fisher) then uses the same samples for Λ as for the
        covariances (``token_memory=0``: fresh samples in a second pass, as Kronfluence).

        Under ``torch.distributed`` batch i is processed by rank ``i % world`` and the sums and
        counts are all-reduced: every rank ends with the same factors."""
        select = dist.mine if dist.enabled() else None
        dt = self.dtype
        dev = self.device
        self._check_factor_memory(dt, dev)
        keep_left = _token_budget(token_memory, dev)
        kept, start = [], None      # the first batches' tokens; offset of the first one not kept
        cov = OrderedDict()
        for name, m in self.modules.items():
            dout, din = layer_shape(m)
            cov[name] = dict(A=torch.zeros(din, din, dtype=dt, device=dev), nA=0,
                             S=torch.zeros(dout, dout, dtype=dt, device=dev), nS=0,
                             amax=torch.zeros(2, dtype=torch.float64, device=dev))
        for offset, factors in self._pass(train, batch_size, self.fisher_loss_fn,
                                          "EK-FAC covariances", self._fisher_arg, "train", select,
                                          zero_masked=False):  # _kept_rows drops the masked
            rows = _kept_rows(factors)      # padding dropped: the captured tensors are freed
            del factors
            if start is None:
                keep_left -= _held_bytes(rows)
                if keep_left >= 0:
                    kept.append(rows)
                else:
                    start = offset
            readers: dict = {}
            for A0, _, _ in rows.values():
                readers[id(A0)] = readers.get(id(A0), 0) + 1
            shared: dict = {}   # an input several layers read: its gram and |a| once
            for name, (A0, G0, _) in rows.items():
                st = cov[name]
                A, G = A0.to(dt), G0.to(dt)
                ntok = A.shape[0]
                if readers[id(A0)] > 1:
                    if id(A0) not in shared:
                        shared[id(A0)] = (_add_gram(torch.zeros_like(st["A"]), A),
                                          _largest_abs(A) if A.numel() else None)
                    st["A"].add_(shared[id(A0)][0])
                    amax_a = shared[id(A0)][1]
                else:
                    _add_gram(st["A"], A)
                    amax_a = _largest_abs(A) if A.numel() else None
                _add_gram(st["S"], G)
                st["nA"] += ntok
                st["nS"] += ntok
                if A.numel():       # largest |a|, |g|: named when the layer over/underflows
                    st["amax"] = torch.maximum(st["amax"], torch.stack(
                        [amax_a, _largest_abs(G)]).double())
            del rows, shared, readers
        for st in cov.values():
            dist.all_reduce_sum_(st["A"])
            dist.all_reduce_sum_(st["S"])
            st["nA"] = dist.all_reduce_int(st["nA"])
            st["nS"] = dist.all_reduce_int(st["nS"])
            dist.all_reduce_sum_(st["amax"])    # zero iff zero on every rank (messages only)
        layers = OrderedDict()
        done = []   # (covariance, count, eigh): layers fed the same input (an attention's q, k, v)
                    # have equal input covariances and share one eigendecomposition

        def eigh(name, which, C, n, xmax):
            for C0, n0, (e, Q) in done:
                if n0 == n and C0.shape == C.shape and torch.equal(C0, C):
                    return e.clone(), Q.clone()
            done.append((C, n, _eigh(name, which, C, n, xmax, self.eigh_dtype or dt)))
            return done[-1][2]

        for name, st in cov.items():
            nA, nS = max(st["nA"], 1), max(st["nS"], 1)
            eA, QA = eigh(name, "input", st["A"], nA, float(st["amax"][0]))
            eS, QS = eigh(name, "output-gradient", st["S"], nS, float(st["amax"][1]))
            layers[name] = dict(QA=QA.to(dt).contiguous(), QS=QS.to(dt).contiguous(),
                                amax=st["amax"],
                                eigA=eA, eigS=eS, nA=st["nA"],
                                lam=torch.zeros(QS.shape[0], QA.shape[0], dtype=dt, device=dev))
        del cov, done

        def correct(rows):
            for name, (A, G, offs) in rows.items():
                L = layers[name]
                L["lam"] += ekfac_lambda(A.to(dt), G.to(dt), L["QA"], L["QS"],
                                         offsets=offs).to(dt)
            return next(iter(rows.values()))[2].numel() - 1

        n = 0
        kept.reverse()
        while kept:             # in order, each batch freed once used
            n += correct(kept.pop())
        if start is not None:
            for _, factors in self._pass(train, batch_size, self.fisher_loss_fn,
                                         "EK-FAC eigenvalue correction", self._fisher_arg,
                                         "train", select, start, zero_masked=False):
                n += correct(_kept_rows(factors))
        n = dist.all_reduce_int(n)
        for name, L in layers.items():
            dist.all_reduce_sum_(L["lam"])
            L["lam"] /= max(n, 1)
            lam_d = 0.1 * float(L["lam"].double().mean()) if self.damping is None else self.damping
            L["damping"] = lam_d
            _check_denominator(name, L, self.damping is None, *L.pop("amax").tolist())
        self.factors = layers
        self.n_fit = n
        self._weights_sha256 = hash_state(self.model.state_dict())
        return self

    # ------------------------------------------------------------------ preconditioning
    def _inv_denominator(self, name):
        """``1 / (Λ + λ)`` of layer ``name``, recomputed per call. Not cached: it costs 0.13 ms
        for a 1024×257 layer (1 thread) against 750 ms for rotating 64 queries of it, and a cache
        would hold a second Λ per layer outside ``max_factor_memory``."""
        L = self.factors[name]
        return 1.0 / (L["lam"] + L["damping"])

    def precondition(self, name: str, D: torch.Tensor) -> torch.Tensor:
        """``H⁻¹D`` of layer ``name`` for gradients ``D`` [..., dout, din]."""
        L = self.factors[name]
        QA, QS = L["QA"], L["QS"]
        R = QS.T @ D.to(QA.dtype) @ QA
        R = R * self._inv_denominator(name)
        return QS @ R @ QA.T

    def rotates_tokens(self, name: str, T: int) -> bool:
        """Whether ``Q_Sᵀ D_n Q_A`` of examples with T tokens is cheaper from rotated tokens,
        ``(G_n Q_S)ᵀ(A_n Q_A)``: ``2·T·(din² + dout² + din·dout)`` FLOPs, than by rotating the
        dense gradient ``G_nᵀA_n``: ``2·(T·din·dout + dout·din·(din + dout))``; i.e. whether
        ``T·(din² + dout²) <= dout·din·(din + dout)`` (roughly T <= din·dout / (din + dout)).
        ``force_rotation`` ("tokens" / "dense") overrides the rule (tests, benchmarks)."""
        if self.force_rotation is not None:
            return self.force_rotation == "tokens"
        dout, din = self.factors[name]["lam"].shape
        return T * (din * din + dout * dout) <= dout * din * (din + dout)

    def rotated(self, name: str, rec, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, dout, din] Q_Sᵀ D_n Q_A`` of a ``LayerBatch`` or ``DenseLayer``, by the cheaper
        of the two orders (:meth:`rotates_tokens`); a fresh tensor, or ``out`` written (callers
        scale it in place)."""
        dt = self.dtype
        L = self.factors[name]
        if isinstance(rec, LayerBatch) and self.rotates_tokens(name, rec.A.shape[1]):
            At, Gt = c.rotate_tokens(rec.A.detach().to(dt), rec.G.detach().to(dt), L["QA"],
                                     L["QS"], rec.mask)
            return torch.bmm(Gt.transpose(1, 2), At, out=out)
        D = rec.D.to(dt) if isinstance(rec, DenseLayer) else rec.to(dt).dense()
        R = L["QS"].T @ D @ L["QA"]
        return R if out is None else out.copy_(R)

    # ------------------------------------------------------------------ scoring protocol
    # (fastinf.scoring runs every loop; see docs/architecture.md)
    def terms(self):
        return [(self, 1.0, contextlib.nullcontext)]

    writes_into = True      # query_layers takes sink= (fastinf.scoring writes into its buffers)

    # query_layers takes compact=: exact queries kept as rotated tokens (EigenTokens) where the
    # engine finds that cheaper (fastinf.scoring.query_batches); False keeps them dense
    compact_queries: bool = True

    def query_layers(self, layers: Dict[str, LayerBatch], query_rank: Optional[int] = None,
                     sink=None, query_svd: str = "randomized", compact=False):
        """The preconditioned query gradients ``H⁻¹D_q`` per layer, kept in the eigenbasis:
        ``Eigen(X_q [Q, dout, din], Q_A, Q_S)`` with ``X_q = (Q_Sᵀ D_q Q_A) ⊘ (Λ + λ)`` (from
        rotated tokens where cheaper, :meth:`rotated`); scores are taken against rotated train
        tokens, ``⟨X_q, (G_n Q_S)ᵀ(A_n Q_A)⟩``, or against ``Q_S X_q Q_Aᵀ`` where rotating the
        queries back once is cheaper (:class:`fastinf.layers.Query` decides).

        With ``query_rank=r``: a rank-r approximation ``X_q ≈ L Rᵀ`` in the eigenbasis
        (``query_svd="randomized"``: ``ops._common.randomized_svd``, near-best; ``"exact"``: the
        truncated SVD from the Gram on the smaller side, ``ops._common.truncated_svd``), rotated
        back as factors (``Q_S L``, ``Q_A R``: a rank-r approximation of ``H⁻¹D_q`` as good, since
        the SVD commutes with orthogonal rotations): ``LayerBatch(A=(Q_A R)ᵀ [Q, r, din],
        G=(Q_S L)ᵀ [Q, r, dout])``, ``Q·r·(din + dout)`` numbers per layer.

        H⁻¹D_q is not of rank ≤ T_q in general (the ⊘ (Λ+λ) is elementwise), so exact scores
        keep ``X_q``, either dense or, with ``compact``, as the rotated tokens it is rebuilt from
        per train tile (:class:`fastinf.layers.EigenTokens`, ``T·(din + dout)`` numbers per query
        instead of ``din·dout``; ``compact=True``: the layers where that is fewer for this batch,
        a set: those layers; ignored with ``query_rank``). The engine chooses it where the
        queries do not fit its memory budget densely (:func:`fastinf.scoring.query_batches`).
        ``sink(name, B, (dout, din), dtype, device)``: where to write a layer's ``X_q`` (the
        query state's buffer, so it is not copied there), or None; ``sink.tokens(name, B, T,
        din, dout, dtype, device)``, where present: the same for the rotated tokens."""
        out = {}
        for name, lb in layers.items():
            L = self.factors[name]
            if query_rank is None and isinstance(lb, LayerBatch) and (
                    name in compact if isinstance(compact, (set, frozenset)) else
                    compact and lb.A.shape[1] * (lb.din + lb.dout) < lb.din * lb.dout):
                dt = self.dtype
                B, T = lb.A.shape[:2]
                dst = None if sink is None or not hasattr(sink, "tokens") else \
                    sink.tokens(name, B, T, lb.din, lb.dout, dt, L["QA"].device)
                At, Gt = c.rotate_tokens(lb.A.detach().to(dt), lb.G.detach().to(dt), L["QA"],
                                         L["QS"], lb.mask, out=dst)
                out[name] = EigenTokens(At, Gt, L["lam"], L["damping"], L["QA"], L["QS"])
                continue
            dst, shape = None, (len(lb), L["QS"].shape[0], L["QA"].shape[0])
            if sink is not None and query_rank is None:
                dst = sink(name, shape[0], shape[1:], self.dtype, L["QA"].device)
            elif query_rank is not None:        # consumed by the SVD below
                dst = c.scratch("ekfac.query_rank", shape, self.dtype, L["QA"].device)
            X = self.rotated(name, lb, dst).mul_(self._inv_denominator(name))
            if query_rank is None:
                out[name] = Eigen(X.contiguous(), L["QA"], L["QS"])
                continue
            svd = c.randomized_svd if query_svd == "randomized" else c.truncated_svd
            Lf, Rf = svd(X, query_rank)                      # X ≈ Lf Rfᵀ, [Q, dout|din, r]
            del X
            out[name] = LayerBatch((Rf.mT @ L["QA"].T).contiguous(),      # [Q, r, din]
                                   (Lf.mT @ L["QS"].T).contiguous())      # [Q, r, dout]
        return out

    def train_layers(self, layers):
        return layers

    def self_layer(self, name: str, rec) -> torch.Tensor:
        """``[B]`` ``Σ (Q_Sᵀ D_n Q_A)^∘2 ⊘ (Λ + λ)`` of one layer (:meth:`rotated`). Where
        tokens are rotated, the whole batch's tokens are rotated at once and the per-example
        products squared and weighted in place in tiles (cache-sized on the CPU, as the Λ of
        ``ekfac_lambda``); else examples in workspace-sized tiles."""
        dt = self.dtype
        L = self.factors[name]
        inv = self._inv_denominator(name)
        B = len(rec)
        dout, din = L["QS"].shape[0], L["QA"].shape[0]
        out = torch.zeros(B, dtype=dt, device=self.device)
        per = dout * din * torch.finfo(dt).bits // 8
        if isinstance(rec, LayerBatch) and self.rotates_tokens(name, rec.A.shape[1]):
            At, Gt = c.rotate_tokens(rec.A.detach().to(dt), rec.G.detach().to(dt), L["QA"],
                                     L["QS"], rec.mask)
            nc = c.chunk(B, per, c.CPU_CACHE_TILE) if self.device.type == "cpu" else \
                c.chunk(B, 2 * per)
            for n0 in range(0, B, nc):
                Gk = Gt[n0:n0 + nc].transpose(1, 2)
                R = torch.bmm(Gk, At[n0:n0 + nc],
                              out=c.scratch("ekfac.self", (Gk.shape[0], dout, din), dt, At.device))
                out[n0:n0 + R.shape[0]] = R.square_().mul_(inv).sum((1, 2))
            return out
        nc = c.chunk(B, 3 * per)
        for n0 in range(0, B, nc):
            R = self.rotated(name, _rows(rec, n0, n0 + nc))
            out[n0:n0 + R.shape[0]] = R.square_().mul_(inv).sum((1, 2))
        return out

    def store_spec(self) -> dict:
        self._require_fit("GradientStore")
        fac = {f"{n}.{k}": L[k] for n, L in self.factors.items() for k in ("QA", "QS", "lam")}
        return {"kind": "ekfac", "damping": self.damping,
                "layer_damping": {n: float(L["damping"]) for n, L in self.factors.items()},
                "factors_sha256": hash_state(fac)}

    # ------------------------------------------------------------------ scores
    def _check_rank(self, what, query_rank, query_svd="randomized"):
        self._require_fit(what)
        if query_svd not in ("randomized", "exact"):
            raise ValueError(f"query_svd must be 'randomized' or 'exact', got {query_svd!r}")
        if query_rank is not None and (isinstance(query_rank, bool) or not isinstance(query_rank, int)
                                       or query_rank < 1):
            raise ValueError(f"query_rank must be None or a positive int, got {query_rank!r}")

    def pairwise_scores(self, query, train, batch_size: int = 64, query_rank: Optional[int] = None,
                        measurement_fn: Optional[Callable] = None, *,
                        query_batch_size: Optional[int] = None, per_token: bool = False,
                        per_module: bool = False, query_svd: str = "randomized"):
        """``[n_query, n_train]`` float32 influence scores ``Σ_layers ⟨H⁻¹D_q, D_n⟩`` (CPU).

        ``train``: data, or a :class:`fastinf.GradientStore` built with this method (no
        training-gradient pass then). ``query_rank=r`` approximates each preconditioned query
        gradient at rank r (``score_factored``, or ``score_dense`` against the rank-r matrix
        where that needs fewer FLOPs); None is exact (``score_dense``). ``query_svd``: how the
        rank-r factors are found, ``"randomized"`` (default; randomized subspace iteration with
        one power round: Llama's 256 rank-32 query scores 3.1e-3 from the exact truncation's, see
        :func:`fastinf.ops._common.randomized_svd`) or ``"exact"`` (the truncated SVD). Under ``torch.distributed`` the train side is split across ranks and
        every rank returns the full matrix.

        ``query_batch_size``: queries scored at a time (None: as many as the query memory budget
        ``FASTINF_QUERY_MEMORY_MB``, default 512, holds — ``Σ_layers dout·din`` numbers per
        query, ``r·(din+dout)`` with ``query_rank=r``); the train side is recomputed per query
        batch unless ``train`` is a store. ``per_token=True``: ``[n_query, n_train, T]`` scores
        per train token (masked tokens 0; summing over T gives the pairwise scores; every tracked
        layer must see the same T tokens). ``per_module=True``: ``{module name: scores}`` summing
        to the total. See docs/ekfac.md.
        """
        self._check_rank("pairwise_scores", query_rank, query_svd)
        rank = {} if query_rank is None else {"query_rank": query_rank, "query_svd": query_svd}
        return scoring.pairwise(self, query, train, batch_size, measurement_fn=measurement_fn,
                                query_batch_size=query_batch_size, per_token=per_token,
                                per_module=per_module, **rank)

    def top_influences(self, query, train, k: int = 10, largest: bool = True,
                       train_indices=None, batch_size: int = 64, query_rank: Optional[int] = None,
                       measurement_fn: Optional[Callable] = None, *,
                       query_batch_size: Optional[int] = None, query_svd: str = "randomized"):
        """``(values [n_query, k], indices [n_query, k])``: the k most (``largest=False``: least)
        influential training examples per query, streamed over the store's shards (or chunks of
        ``train``): memory bounded by k, the queries and one shard, never n_query × n_train.
        ``train_indices``: one index tensor for all queries or a list of one per query, restricting
        the candidates; missing candidates give ``nan`` / ``-1``. ``query_batch_size`` as in
        :meth:`pairwise_scores` (each query batch keeps its own running top-k), and so are
        ``query_rank`` and ``query_svd``."""
        self._check_rank("top_influences", query_rank, query_svd)
        rank = {} if query_rank is None else {"query_rank": query_rank, "query_svd": query_svd}
        return scoring.top_influences(self, query, train, k, largest, train_indices, batch_size,
                                      measurement_fn=measurement_fn,
                                      query_batch_size=query_batch_size, **rank)

    def self_scores(self, train, batch_size: int = 64) -> torch.Tensor:
        """``[n_train]`` float32 self-influence ``Σ_layers ⟨H⁻¹D_n, D_n⟩`` (CPU; from a store:
        precomputed at build time)."""
        self._require_fit("self_scores")
        return scoring.self_scores(self, train, batch_size)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        self._require_fit("save")
        layers = OrderedDict()
        for name, L in self.factors.items():
            dout, din = layer_shape(self.modules[name])
            layers[name] = dict(QA=L["QA"].cpu(), QS=L["QS"].cpu(), lam=L["lam"].cpu(),
                                eigA=L["eigA"].cpu(), eigS=L["eigS"].cpu(),
                                damping=L["damping"], shape=(dout, din),
                                type=type(self.modules[name]).__name__)
        return dict(format=FORMAT, version=VERSION, damping=self.damping, n_fit=self.n_fit,
                    layers=layers, weights_sha256=self._weights_sha256)

    def save(self, path) -> None:
        """Writes the fitted factors (Q_A, Q_S, Λ, λ, module names, types and shapes, settings,
        a sha256 of the weights fitted on) atomically (temp file + rename). An unwritable path
        is an ``OSError`` naming it; the factors stay in memory."""
        path = os.fspath(path)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "wb") as fh:
                torch.save(self.state_dict(), fh)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise type(exc)(f"EKFAC.save: cannot write {path}: "
                          f"{exc.strerror or exc}; the fitted factors are still in memory: "
                          "save them to a writable path") from exc

    @classmethod
    def load(cls, path, model: nn.Module, loss_fn: Callable, **kwargs) -> "EKFAC":
        """Restores factors saved by :meth:`save` for ``model`` (same tracked module names and
        shapes, else ValueError). ``kwargs`` as in the constructor (``modules`` excluded)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"EKFAC.load: no EK-FAC factor file at {path}")
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:    # torch's zip reader / unpickler: truncated or foreign file
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"{path}: cannot read the EK-FAC factor file: it is truncated, "
                             f"corrupt or not a file written by EKFAC.save ({why})") from exc
        if not isinstance(st, dict) or st.get("format") != FORMAT:
            raise ValueError(f"{path}: not a fastinf EK-FAC factor file")
        if st.get("version") != VERSION:
            raise ValueError(f"{path}: factor file version {st.get('version')} is not supported "
                             f"(expected {VERSION})")
        if "modules" in kwargs:
            raise TypeError("EKFAC.load: the tracked modules come from the file; drop modules=")
        names = list(st["layers"])
        named = dict(model.named_modules())
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(f"EKFAC.load: the model has no module(s) {missing} that the factors in "
                             f"{path} were fitted on; load them onto the same architecture")
        for n in names:
            m = named[n]
            exp = tuple(st["layers"][n]["shape"])
            try:
                got = layer_shape(m)
            except AttributeError:
                got = None
            if got != exp:
                raise ValueError(f"EKFAC.load: module {n!r} is a {type(m).__name__} with gradient "
                                 f"shape {got}; the factors were fitted on shape {exp}")
            fitted_type = st["layers"][n].get("type")
            if fitted_type not in (None, type(m).__name__):
                raise ValueError(f"EKFAC.load: module {n!r} is a {type(m).__name__}; the factors "
                                 f"in {path} were fitted on a {fitted_type} (same shape, other "
                                 "layer): load them onto the architecture they were fitted on")
        override = "damping" in kwargs
        kwargs.setdefault("damping", st["damping"])
        ek = cls(model, loss_fn, modules=names, **kwargs)
        dev, dt = ek.device, ek.dtype
        ek.factors = OrderedDict()
        for n in names:
            L = st["layers"][n]
            lam = L["lam"].to(dev, dt)
            d = L["damping"]
            if override:  # a damping given to load() replaces the stored one
                d = 0.1 * float(lam.double().mean()) if ek.damping is None else ek.damping
            ek.factors[n] = dict(QA=L["QA"].to(dev, dt), QS=L["QS"].to(dev, dt), lam=lam,
                                 eigA=L["eigA"], eigS=L["eigS"], damping=d)
            _check_denominator(n, ek.factors[n], ek.damping is None)
        ek.n_fit = st["n_fit"]
        ek._weights_sha256 = st.get("weights_sha256")
        if ek._weights_sha256 is not None and ek._weights_sha256 != hash_state(model.state_dict()):
            warnings.warn(f"EKFAC.load: the factors in {path} were fitted on other weights of this "
                          "architecture (weights sha256 differs): the scores use the curvature of "
                          "those weights; refit if the model changed", UserWarning, stacklevel=2)
        return ek

    @classmethod
    def from_factors(cls, model: nn.Module, loss_fn: Callable, factors: Dict[str, dict], *,
                     n_fit: int = 0, **kwargs) -> "EKFAC":
        """An EKFAC with factors fitted elsewhere (e.g. imported from another library).

        ``factors`` maps tracked module names to ``dict(QA=[din, din], QS=[dout, dout],
        lam=[dout, din])`` with Λ averaged over examples (columns of Q_A / Q_S are the
        eigenvectors; the bias column is the last one of din), optionally ``eigA``/``eigS``.
        The damping is ``kwargs["damping"]`` (None: ``0.1·mean(Λ)`` per layer). ``kwargs`` as in
        the constructor (``modules`` excluded: the modules are the keys of ``factors``).
        """
        if "modules" in kwargs:
            raise TypeError("EKFAC.from_factors: the tracked modules are the keys of factors; "
                            "drop modules=")
        ek = cls(model, loss_fn, modules=list(factors), **kwargs)
        dev, dt = ek.device, ek.dtype
        ek.factors = OrderedDict()
        for name, m in ek.modules.items():
            F_ = factors[name]
            dout, din = layer_shape(m)
            QA, QS, lam = (torch.as_tensor(F_[k]).to(dev, dt).contiguous() for k in ("QA", "QS", "lam"))
            if QA.shape != (din, din) or QS.shape != (dout, dout) or lam.shape != (dout, din):
                raise ValueError(f"EKFAC.from_factors: module {name!r} has gradient shape "
                                 f"{(dout, din)}; got QA {tuple(QA.shape)}, QS {tuple(QS.shape)}, "
                                 f"lam {tuple(lam.shape)} (expected ({din}, {din}), "
                                 f"({dout}, {dout}), ({dout}, {din}))")
            d = 0.1 * float(lam.double().mean()) if ek.damping is None else ek.damping
            ek.factors[name] = dict(QA=QA, QS=QS, lam=lam, damping=d,
                                    eigA=F_.get("eigA", torch.zeros(din, dtype=torch.float64)),
                                    eigS=F_.get("eigS", torch.zeros(dout, dtype=torch.float64)),
                                    nA=F_.get("nA", 0))
            _check_denominator(name, ek.factors[name], ek.damping is None)
        ek.n_fit = int(n_fit)
        return ek
