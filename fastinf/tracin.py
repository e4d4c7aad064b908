"""TracIn over checkpoints, exact (ghost / tiled) or on projected per-example gradients.

``score(q, n) = Σ_c η_c Σ_layers ⟨D_q^c, D_n^c⟩_F``. Exact scores never hold
per-example gradients for the dataset: the query factors ``(A_q, G_q)`` are kept per checkpoint
and layer, and each train batch is scored against them by :func:`fastinf.ops.score_factored`
(ghost or tiled-materialised, by its cost model) or, when cheaper, against the query gradients
``D_q = G_qᵀ A_q`` by :func:`fastinf.ops.score_dense`. Projected scores replace ``D`` by
``P_outᵀ D P_in`` (:class:`KroneckerProjection`, op ``kron_project``) or ``Φ vec(D)``
(:class:`RandomProjection`, op ``jl_project``).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import scoring
from .capture import tracked_modules, tracking_summary
from .layers import DenseLayer, LayerBatch, Projected
from .ops import _common as c
from .ops.jl_project import jl_project, phi_block, seed_key
from .ops.kron_project import kron_project
from .store import hash_state

__all__ = ["TracIn", "KroneckerProjection", "RandomProjection"]

log = logging.getLogger("fastinf")


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


# --------------------------------------------------------------------------- TracIn
class TracIn:
    """TracIn influence scores (Pruthi et al. 2020) over one or several checkpoints.

    Args:
        model: the network; tracked layers are its ``nn.Linear``, ``nn.Conv2d`` (``groups=1``)
            and transformers' ``Conv1D`` (or ``modules``; see docs/constraints.md). What is
            tracked is in ``self.tracked_modules`` (``{name: {"type", "params"}}``) and logged
            once (logger ``"fastinf"``, INFO).
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
        summary = tracking_summary(model, self.modules)
        self.tracked_modules = summary["tracked"]     # name -> {"type", "params"}
        log.info(summary["line"])
        self.checkpoints = _normalize_checkpoints(checkpoints)
        self.projection = projection
        self.progress = progress
        self.token_mask_fn = token_mask_fn
        self.backend = backend
        self._kron_mats: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the scores (float32)."""
        return torch.float32

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

    def _project(self, factors) -> torch.Tensor:
        """Projected gradients ``[B, K]`` of one batch (K summed over layers)."""
        proj = self.projection
        device = next(iter(factors.values())).A.device
        if isinstance(proj, KroneckerProjection):
            ys = []
            for li, lb in enumerate(factors.values()):
                key = (li, lb.din, lb.dout, device)
                if key not in self._kron_mats:
                    self._kron_mats[key] = proj.matrices(li, lb.din, lb.dout, device=device)
                P_in, P_out = self._kron_mats[key]
                ys.append(kron_project(lb.A.detach().float(), lb.G.detach().float(), P_in, P_out,
                                       a_mask=lb.mask, backend=self.backend).flatten(1))
            return torch.cat(ys, 1)
        # dense JL of the flattened per-example gradient, materialised in example tiles
        B = len(next(iter(factors.values())))
        p = sum(lb.dout * lb.din for lb in factors.values())
        out = []
        nb = c.chunk(B, p * 4.0)
        for b0 in range(0, B, nb):
            X = torch.cat([LayerBatch(lb.A[b0:b0 + nb], lb.G[b0:b0 + nb]).to(torch.float32)
                           .dense().flatten(1) for lb in factors.values()], 1)
            out.append(jl_project(X, proj.dim, seed=proj.seed, kind=proj.kind,
                                  backend=self.backend))
        return torch.cat(out, 0)

    # ------------------------------------------------------------------ scoring protocol
    # (fastinf.scoring runs every loop; see docs/architecture.md)
    def terms(self):
        return [(self, ck.lr, functools.partial(self._at, ck)) for ck in self.checkpoints]

    def train_layers(self, layers):
        """The factors themselves, or ``{"proj": Projected [B, K]}`` with a projection."""
        return layers if self.projection is None else {"proj": Projected(self._project(layers))}

    def query_layers(self, layers):
        if self.projection is None:
            return {n: lb.to(torch.float32) for n, lb in layers.items()}
        return self.train_layers(layers)

    def self_layer(self, part: str, rec) -> torch.Tensor:
        """``[B]`` ``‖D_n‖²`` (projected: ``‖X_n‖²``); factors by the ghost Gram products or
        the materialised gradients, whichever costs fewer FLOPs."""
        if isinstance(rec, Projected):
            return rec.X.float().square().sum(1)
        if isinstance(rec, DenseLayer):
            return rec.D.float().square().sum((1, 2))
        A = c.mask_rows(rec.A.detach().float(), rec.mask)
        G = c.mask_rows(rec.G.detach().float(), rec.mask)
        N, T, din = A.shape
        dout = G.shape[2]
        out = torch.empty(N, dtype=torch.float32, device=A.device)
        ghost = T * T * (din + dout) <= T * din * dout
        nc = c.chunk(N, (2 * T * T if ghost else dout * din) * 4.0)
        for n0 in range(0, N, nc):
            a, g = A[n0:n0 + nc], G[n0:n0 + nc]
            if ghost:
                out[n0:n0 + nc] = ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum((1, 2))
            else:
                out[n0:n0 + nc] = torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
        return out

    def store_spec(self) -> dict:
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

    # ------------------------------------------------------------------ public API
    def pairwise_scores(self, query, train, batch_size: int = 64,
                        measurement_fn: Optional[Callable] = None, *,
                        query_batch_size: Optional[int] = None, per_token: bool = False,
                        per_module: bool = False):
        """TracIn scores ``[n_query, n_train]`` (float32, CPU).

        ``train``: data, or a :class:`fastinf.GradientStore` built with this TracIn (no training
        gradient pass then). ``measurement_fn(model, batch) -> [B]`` replaces ``loss_fn`` for the
        queries. Under ``torch.distributed`` every rank returns the full matrix.
        ``query_batch_size``, ``per_token`` (``[n_query, n_train, T]``) and ``per_module``
        (``{module name: scores}``) as in :meth:`fastinf.EKFAC.pairwise_scores`; per-token and
        per-module scores need ``projection=None``.
        """
        return scoring.pairwise(self, query, train, batch_size, measurement_fn=measurement_fn,
                                query_batch_size=query_batch_size, per_token=per_token,
                                per_module=per_module)

    def top_influences(self, query, train, k: int = 10, largest: bool = True,
                       train_indices=None, batch_size: int = 64,
                       measurement_fn: Optional[Callable] = None, *,
                       query_batch_size: Optional[int] = None):
        """``(values [n_query, k], indices [n_query, k])`` streamed over shards / chunks of
        ``train`` (memory bounded by k, the queries and one shard); see
        :meth:`fastinf.EKFAC.top_influences`."""
        return scoring.top_influences(self, query, train, k, largest, train_indices, batch_size,
                                      measurement_fn=measurement_fn,
                                      query_batch_size=query_batch_size)

    def self_scores(self, train, batch_size: int = 64) -> torch.Tensor:
        """Self-influence ``Σ_c η_c ‖D_n^c‖²`` (projected when a projection is set), ``[n_train]``
        float32 on the CPU (from a store: precomputed at build time)."""
        return scoring.self_scores(self, train, batch_size)
