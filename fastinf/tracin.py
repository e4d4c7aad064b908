"""TracIn over checkpoints, exact (ghost / tiled) or on projected per-example gradients.

``score(q, n) = Σ_c η_c Σ_layers ⟨D_q^c, D_n^c⟩_F`` (DESIGN.md §1). Exact scores never hold
per-example gradients for the dataset: the query factors ``(A_q, G_q)`` are kept per checkpoint
and layer, and each train batch is scored against them by :func:`fastinf.ops.score_factored`
(ghost or tiled-materialised, by its cost model) or, when cheaper, against the query gradients
``D_q = G_qᵀ A_q`` by :func:`fastinf.ops.score_dense`. Projected scores replace ``D`` by
``P_outᵀ D P_in`` (:class:`KroneckerProjection`, op ``kron_project``) or ``Φ vec(D)``
(:class:`RandomProjection`, op ``jl_project``).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._pass import factor_pass, model_device
from .capture import layer_shape, tracked_modules
from .data import _check_batch_size
from .ops import _common as c
from .ops.jl_project import jl_project, phi_block, seed_key
from .ops.kron_project import kron_project
from .ops.score_dense import flops as dense_flops
from .ops.score_dense import score_dense
from .ops.score_factored import flops as factored_flops
from .ops.score_factored import score_factored
from .store import DenseLayer

__all__ = ["TracIn", "KroneckerProjection", "RandomProjection"]


# --------------------------------------------------------------------------- projections
@dataclass(frozen=True)
class KroneckerProjection:
    """LoGra-style per-layer projection ``D ↦ P_outᵀ D P_in`` (``k_out × k_in`` per layer).

    ``P_in [din, k_in]`` and ``P_out [dout, k_out]`` have N(0, 1/k) entries generated from the
    counter-based hash of ``jl_project`` with a key derived from ``(seed, layer index, side)``,
    so every device and backend builds the same matrices. ``E[P Pᵀ] = I`` makes projected inner
    products unbiased estimates of the exact ones.
    """
    k_in: int
    k_out: int
    seed: int = 0

    def __post_init__(self):
        for name in ("k_in", "k_out"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KroneckerProjection: {name} must be a positive int, got {v!r}")
        seed_key(self.seed)

    def matrices(self, layer: int, din: int, dout: int, device=None, dtype=torch.float32):
        """``(P_in [din, k_in], P_out [dout, k_out])`` of layer number ``layer``."""
        k_in, k_out = self.k_in, self.k_out
        key_in = seed_key(self.seed * 1_000_003 + 2 * layer)
        key_out = seed_key(self.seed * 1_000_003 + 2 * layer + 1)
        P_in = phi_block(key_in, 0, k_in, 0, din, "normal", dtype=torch.float64,
                         device=device).T * (1.0 / math.sqrt(k_in))
        P_out = phi_block(key_out, 0, k_out, 0, dout, "normal", dtype=torch.float64,
                          device=device).T * (1.0 / math.sqrt(k_out))
        return P_in.to(dtype).contiguous(), P_out.to(dtype).contiguous()


@dataclass(frozen=True)
class RandomProjection:
    """Dense JL projection ``vec(D) ↦ Φ vec(D)`` of the whole per-example gradient (all tracked
    layers concatenated in module order), Φ ``[dim, p]`` generated on the fly (``jl_project``)."""
    dim: int
    seed: int = 0
    kind: str = "rademacher"

    def __post_init__(self):
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"RandomProjection: dim must be a positive int, got {self.dim!r}")
        if self.kind not in ("rademacher", "normal"):
            raise ValueError(f"RandomProjection: kind must be 'rademacher' or 'normal', "
                             f"got {self.kind!r}")
        seed_key(self.seed)


# --------------------------------------------------------------------------- checkpoints
@dataclass
class _Checkpoint:
    source: object        # None (current weights), a state dict, or a path
    lr: float
    label: str


def _check_lr(lr, label):
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(float(lr)):
        raise ValueError(f"checkpoints: the learning rate of {label} must be a finite number, "
                         f"got {lr!r}")
    return float(lr)


def _normalize_checkpoints(checkpoints) -> List[_Checkpoint]:
    if checkpoints is None:
        return [_Checkpoint(None, 1.0, "the current weights")]
    if isinstance(checkpoints, (str, os.PathLike, dict)) or not isinstance(checkpoints, Sequence):
        raise TypeError("checkpoints must be a list of (state_dict_or_path, learning_rate) pairs")
    if len(checkpoints) == 0:
        raise ValueError("checkpoints: empty list; pass None to use the current weights")
    out = []
    for i, item in enumerate(checkpoints):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"checkpoints[{i}] must be a (state_dict_or_path, learning_rate) pair, "
                            f"got {type(item).__name__}")
        src, lr = item
        if isinstance(src, (str, os.PathLike)):
            path = os.fspath(src)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoints[{i}]: checkpoint file {path!r} does not exist")
            label = f"checkpoint file {path!r}"
        elif isinstance(src, dict):
            label = f"checkpoints[{i}] (state dict)"
        else:
            raise TypeError(f"checkpoints[{i}]: expected a state dict or a file path, got "
                            f"{type(src).__name__}")
        out.append(_Checkpoint(src, _check_lr(lr, label), label))
    return out


def _load_state(ck: _Checkpoint, model: nn.Module) -> dict:
    sd = ck.source
    if isinstance(sd, (str, os.PathLike)):
        path = os.fspath(sd)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{ck.label} does not exist")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{ck.label} could not be loaded: {type(exc).__name__}: {exc}") from exc
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{ck.label} does not hold a state dict (got {type(sd).__name__})")
    ref = model.state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    shapes = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(ref[k].shape)}" for k in ref
              if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].shape != ref[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}"
                         + (" ..." if len(unexpected) > 8 else ""))
        if shapes:
            parts.append(f"shape mismatches [{'; '.join(shapes[:8])}]")
        raise ValueError(f"{ck.label} does not match the model: " + ", ".join(parts))
    return sd


# --------------------------------------------------------------------------- query factors
@dataclass
class _QueryLayer:
    A: torch.Tensor                      # [Q, S, din]
    G: torch.Tensor                      # [Q, S, dout]
    mask: Optional[torch.Tensor]         # [Q, S] bool or None
    D: Optional[torch.Tensor] = None     # [Q, dout, din], built when score_dense is cheaper
    decided: bool = False
    D_full: Optional[torch.Tensor] = None  # [Q, dout, din], for stored dense train gradients

    def dense(self) -> torch.Tensor:
        if self.D is not None:
            return self.D
        if self.D_full is None:
            self.D_full = torch.bmm(c.mask_rows(self.G, self.mask).transpose(1, 2),
                                    c.mask_rows(self.A, self.mask)).contiguous()
        return self.D_full


def _pad_cat(xs: List[torch.Tensor], S: int) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(x, (0, 0, 0, S - x.shape[1])) for x in xs], 0)


def _stack_layer(parts) -> _QueryLayer:
    S = max(lb.A.shape[1] for lb in parts)
    uniform = all(lb.A.shape[1] == S for lb in parts)
    has_mask = any(lb.mask is not None for lb in parts)
    A = _pad_cat([lb.A for lb in parts], S)
    G = _pad_cat([lb.G for lb in parts], S)
    mask = None
    if has_mask or not uniform:
        ms = []
        for lb in parts:
            m = lb.mask if lb.mask is not None else torch.ones(lb.A.shape[:2], dtype=torch.bool,
                                                               device=lb.A.device)
            ms.append(torch.nn.functional.pad(m, (0, S - m.shape[1]), value=False))
        mask = torch.cat(ms, 0)
    return _QueryLayer(A.contiguous(), G.contiguous(), mask)


# --------------------------------------------------------------------------- TracIn
class TracIn:
    """TracIn influence scores (Pruthi et al. 2020) over one or several checkpoints.

    Args:
        model: the network; tracked layers are its ``nn.Linear`` / ``nn.Conv2d`` (or ``modules``).
        loss_fn: ``loss_fn(model, batch) -> [B]`` per-example losses.
        checkpoints: list of ``(state_dict_or_path, learning_rate)``; default: the model's
            current weights with learning rate 1. The model's own weights are restored after
            every pass.
        modules: names or module objects to track (default: all supported layers).
        projection: None (exact), :class:`KroneckerProjection` or :class:`RandomProjection`.
        progress: show progress bars.
        token_mask_fn: ``token_mask_fn(batch) -> [B, T]`` bool, False for padding tokens.
        backend: kernel backend for the ops (None: fastest usable).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, checkpoints=None, modules=None,
                 projection=None, progress: bool = True, token_mask_fn: Optional[Callable] = None,
                 backend: Optional[str] = None):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) -> [B], got "
                            f"{type(loss_fn).__name__}")
        if projection is not None and not isinstance(projection,
                                                     (KroneckerProjection, RandomProjection)):
            raise TypeError("projection must be None, fastinf.KroneckerProjection or "
                            f"fastinf.RandomProjection, got {type(projection).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.modules = tracked_modules(model, modules)
        self.checkpoints = _normalize_checkpoints(checkpoints)
        self.projection = projection
        self.progress = progress
        self.token_mask_fn = token_mask_fn
        self.backend = backend

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _at(self, ck: _Checkpoint):
        if ck.source is None:
            yield
            return
        sd = _load_state(ck, self.model)
        backup = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            self.model.load_state_dict(sd)
            yield
        finally:
            self.model.load_state_dict(backup)

    def _pass(self, data, batch_size, desc, name, loss_fn=None, what="loss_fn"):
        return factor_pass(self.model, loss_fn or self.loss_fn, data, self.modules, batch_size,
                           token_mask_fn=self.token_mask_fn, desc=desc, progress=self.progress,
                           what=what, name=name)

    def _kron_mats(self, device):
        mats = []
        for li, (name, m) in enumerate(self.modules.items()):
            dout, din = layer_shape(m)
            mats.append(self.projection.matrices(li, din, dout, device=device))
        return mats

    def _project(self, factors, mats) -> torch.Tensor:
        """Projected gradients ``[B, K]`` of one batch (K summed over layers)."""
        proj = self.projection
        if isinstance(proj, KroneckerProjection):
            ys = []
            for (name, _), (P_in, P_out) in zip(self.modules.items(), mats):
                lb = factors[name]
                A, G = lb.A.detach().float(), lb.G.detach().float()
                ys.append(kron_project(A, G, P_in, P_out, a_mask=lb.mask,
                                       backend=self.backend).flatten(1))
            return torch.cat(ys, 1)
        # dense JL of the flattened per-example gradient, materialised in example tiles
        first = next(iter(factors.values()))
        B = first.A.shape[0]
        p = sum(lb.dout * lb.din for lb in factors.values())
        out = []
        nb = c.chunk(B, p * 4.0)
        for b0 in range(0, B, nb):
            X = torch.cat([torch.bmm(factors[n].G[b0:b0 + nb].detach().float().transpose(1, 2),
                                     factors[n].A[b0:b0 + nb].detach().float()).flatten(1)
                           for n in self.modules], 1)
            out.append(jl_project(X, proj.dim, seed=proj.seed, kind=proj.kind,
                                  backend=self.backend))
        return torch.cat(out, 0)

    def _query_factors(self, query, batch_size, loss_fn) -> Dict[str, _QueryLayer]:
        parts: Dict[str, list] = {n: [] for n in self.modules}
        for _, factors in self._pass(query, batch_size, "fastinf tracin: query", "query",
                                     loss_fn, "measurement_fn" if loss_fn else "loss_fn"):
            for n in self.modules:
                lb = factors[n]
                lb.A, lb.G = lb.A.detach().float(), lb.G.detach().float()
                parts[n].append(lb)
        return {n: _stack_layer(parts[n]) for n in self.modules}

    def _layer_scores(self, lb, q: _QueryLayer) -> torch.Tensor:
        """``[B, Q]`` exact scores of one train batch against the query factors of one layer."""
        A, G = lb.A.detach().float(), lb.G.detach().float()
        N, T, din = A.shape
        Q, S, dout = q.G.shape
        if not q.decided:
            # score_factored (ghost or tiled) vs score_dense against D_q = G_qᵀ A_q, per batch;
            # D_q is built once (2·Q·S·dout·din FLOPs) and kept only if it fits the workspace.
            f_fact = min(factored_flops(N, T, Q, S, din, dout).values())
            f_dense = min(dense_flops(N, T, Q, din, dout).values())
            if f_dense < f_fact and Q * dout * din * 4 <= 4 * c.workspace_bytes():
                Gq = c.mask_rows(q.G, q.mask)
                q.D = torch.bmm(Gq.transpose(1, 2), c.mask_rows(q.A, q.mask)).contiguous()
            q.decided = True
        if q.D is not None:
            return score_dense(A, G, q.D, a_mask=lb.mask, backend=self.backend)
        return score_factored(A, G, q.A, q.G, a_mask=lb.mask, v_mask=q.mask,
                              backend=self.backend)

    @staticmethod
    def _self_layer(lb) -> torch.Tensor:
        """``‖D_n‖²`` of every example of a batch, ghost or materialised (cheaper by FLOPs)."""
        A, G = lb.A.detach().float(), lb.G.detach().float()
        if lb.mask is not None:
            A, G = c.mask_rows(A, lb.mask), c.mask_rows(G, lb.mask)
        N, T, din = A.shape
        dout = G.shape[2]
        out = torch.empty(N, dtype=torch.float32, device=A.device)
        ghost = T * T * (din + dout) <= T * din * dout
        per = (2 * T * T if ghost else dout * din) * 4.0
        nc = c.chunk(N, per)
        for n0 in range(0, N, nc):
            a, g = A[n0:n0 + nc], G[n0:n0 + nc]
            if ghost:
                out[n0:n0 + nc] = ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum((1, 2))
            else:
                out[n0:n0 + nc] = torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
        return out

    def _layer_train(self, lb, q: _QueryLayer) -> torch.Tensor:
        """``[B, Q]`` of one layer: a captured / stored factor batch, or stored dense gradients."""
        if isinstance(lb, DenseLayer):
            Dq = q.dense()
            return lb.D.float().flatten(1) @ Dq.flatten(1).T
        return self._layer_scores(lb, q)

    def _entries(self, factors, mats):
        """What one batch contributes for one checkpoint: the factors, or projected ``[B, K]``."""
        return factors if self.projection is None else self._project(factors, mats)

    def _score_batch(self, q, entries) -> torch.Tensor:
        """``[B, Q]`` scores of one train batch for one checkpoint (no learning rate): the one
        per-batch scoring step of the direct and the store paths."""
        if self.projection is None:
            return sum(self._layer_train(entries[n], q[n]) for n in self.modules)
        return entries.float() @ q.T

    def _self_batch(self, entries) -> torch.Tensor:
        """``[B]`` ``‖D_n‖²`` (projected when a projection is set) for one checkpoint."""
        if self.projection is not None:
            return entries.float().square().sum(1)
        total = None
        for n in self.modules:
            lb = entries[n]
            s = lb.D.float().square().sum((1, 2)) if isinstance(lb, DenseLayer) \
                else self._self_layer(lb)
            total = s if total is None else total + s
        return total

    def _query_state(self, query, batch_size, measurement_fn=None):
        """Per checkpoint ``(checkpoint, query factors or projected queries, projection mats)``."""
        _check_batch_size(batch_size)
        if measurement_fn is not None and not callable(measurement_fn):
            raise TypeError("measurement_fn must be callable as measurement_fn(model, batch)")
        device = model_device(self.model)
        states = []
        for ck in self.checkpoints:
            with self._at(ck):
                mats = self._kron_mats(device) if isinstance(
                    self.projection, KroneckerProjection) else None
                if self.projection is None:
                    q = self._query_factors(query, batch_size, measurement_fn)
                else:
                    q = torch.cat([self._project(f, mats) for _, f in self._pass(
                        query, batch_size, "fastinf tracin: query", "query", measurement_fn,
                        "measurement_fn" if measurement_fn else "loss_fn")], 0)
            states.append((ck, q, mats))
        return states

    @staticmethod
    def _n_query(states) -> int:
        q = states[0][1]
        return q.shape[0] if isinstance(q, torch.Tensor) else next(iter(q.values())).A.shape[0]

    def _direct_block(self, states, data, batch_size) -> torch.Tensor:
        """``[Q, n]`` scores against ``data`` by a gradient pass per checkpoint."""
        from .data import num_examples

        out = torch.zeros(self._n_query(states), num_examples(data), dtype=torch.float32,
                          device=model_device(self.model))
        for ck, q, mats in states:
            with self._at(ck):
                for offset, factors in self._pass(data, batch_size, "fastinf tracin: train",
                                                  "train"):
                    s = self._score_batch(q, self._entries(factors, mats))
                    out[:, offset:offset + s.shape[0]] += ck.lr * s.T
        return out

    def _shard_block(self, states, store, tensors) -> torch.Tensor:
        ents = store.entries(tensors, len(states), self.modules, model_device(self.model))
        out = None
        for (ck, q, _), e in zip(states, ents):
            s = ck.lr * self._score_batch(q, e).T
            out = s if out is None else out + s
        return out

    # ------------------------------------------------------------------ public API
    def pairwise_scores(self, query, train, batch_size: int = 64,
                        measurement_fn: Optional[Callable] = None) -> torch.Tensor:
        """TracIn scores ``[n_query, n_train]`` (float32, CPU).

        ``train``: data, or a :class:`fastinf.GradientStore` built with this TracIn (no training
        gradient pass then). ``measurement_fn(model, batch) -> [B]`` replaces ``loss_fn`` for the
        queries. Under ``torch.distributed`` every rank returns the full matrix.
        """
        _check_batch_size(batch_size)
        from . import store

        return store.pairwise(self, query, train, batch_size,
                              dict(measurement_fn=measurement_fn))

    def top_influences(self, query, train, k: int = 10, largest: bool = True,
                       train_indices=None, batch_size: int = 64,
                       measurement_fn: Optional[Callable] = None):
        """``(values [n_query, k], indices [n_query, k])`` streamed over shards / chunks of
        ``train`` (memory bounded by k, the queries and one shard); see
        :meth:`fastinf.EKFAC.top_influences`."""
        _check_batch_size(batch_size)
        from . import store

        return store.top_influences(self, query, train, k, largest, train_indices, batch_size,
                                    dict(measurement_fn=measurement_fn))

    def self_scores(self, train, batch_size: int = 64) -> torch.Tensor:
        """Self-influence ``Σ_c η_c ‖D_n^c‖²`` (projected when a projection is set), ``[n_train]``
        (from a store: precomputed at build time)."""
        _check_batch_size(batch_size)
        from .data import num_examples
        from .store import self_scores_of

        pre = self_scores_of(self, train, batch_size)
        if pre is not None:
            return pre
        device = model_device(self.model)
        out = torch.zeros(num_examples(train), dtype=torch.float32, device=device)
        for ck in self.checkpoints:
            with self._at(ck):
                mats = self._kron_mats(device) if isinstance(
                    self.projection, KroneckerProjection) else None
                for offset, factors in self._pass(train, batch_size, "fastinf tracin: self",
                                                  "train"):
                    s = self._self_batch(self._entries(factors, mats))
                    out[offset:offset + s.shape[0]] += ck.lr * s
        return out.cpu()

    # ------------------------------------------------------------------ store protocol
    def _store_spec(self) -> dict:
        from .store import hash_state

        cks = []
        for ck in self.checkpoints:
            sd = self.model.state_dict() if ck.source is None else _load_state(ck, self.model)
            cks.append({"lr": ck.lr, "weights_sha256": hash_state(sd)})
        proj = None
        if isinstance(self.projection, KroneckerProjection):
            proj = {"type": "kronecker", "k_in": self.projection.k_in,
                    "k_out": self.projection.k_out, "seed": self.projection.seed}
        elif isinstance(self.projection, RandomProjection):
            proj = {"type": "random", "dim": self.projection.dim, "seed": self.projection.seed,
                    "kind": self.projection.kind}
        return {"kind": "tracin", "checkpoints": cks, "projection": proj}

    def _store_dtype(self) -> torch.dtype:
        if self.projection is not None:
            return torch.float32
        for p in self.model.parameters():
            return p.dtype
        return torch.float32

    def _store_layouts(self, first, batch_size) -> dict:
        from .store import choose_layouts

        if self.projection is not None:
            return {}
        for _, factors in self._pass(first, batch_size, "fastinf tracin: store layout", "train"):
            return choose_layouts(factors)

    def _store_shard(self, data, batch_size, layouts) -> dict:
        from .store import cat_parts, encode_layer

        dtype = self._store_dtype()
        device = model_device(self.model)
        parts, self_total = [], None
        for ci, ck in enumerate(self.checkpoints):
            selfs = []
            with self._at(ck):
                mats = self._kron_mats(device) if isinstance(
                    self.projection, KroneckerProjection) else None
                for _, factors in self._pass(data, batch_size, "fastinf tracin: store", "train"):
                    e = self._entries(factors, mats)
                    if self.projection is not None:
                        parts.append({f"c{ci}/proj": e.detach().float().cpu()})
                    else:
                        part = {}
                        for n in self.modules:
                            part.update(encode_layer(f"c{ci}/{n}", e[n], layouts[n], dtype))
                        parts.append(part)
                    selfs.append(self._self_batch(e).float().cpu())
            s = ck.lr * torch.cat(selfs)
            self_total = s if self_total is None else self_total + s
        out = cat_parts(parts)
        out["self"] = self_total
        return out
