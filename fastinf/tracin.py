"""TracIn over checkpoints, exact (ghost / tiled) or on projected per-example gradients.

``score(q, n) = Σ_c η_c Σ_layers ⟨D_q^c, D_n^c⟩_F``. Exact scores never hold
per-example gradients for the dataset: the query factors ``(A_q, G_q)`` are kept per checkpoint
and layer, and each train batch is scored against them by :func:`fastinf.ops.score_factored`
(ghost or tiled-materialised, by its cost model) or, when cheaper, against the query gradients
``D_q = G_qᵀ A_q`` by :func:`fastinf.ops.score_dense`. Projected scores replace ``D`` by
``P_outᵀ D P_in`` (:class:`KroneckerProjection`, op ``kron_project``) or ``Φ vec(D)``
(:class:`RandomProjection`, op ``jl_project``). ``preconditioner="adam"`` (LESS, Xia et al. 2024)
replaces each training gradient by the Adam update direction built from the checkpoint's
optimizer moments (dense per example, see docs/tracin.md); :meth:`TracIn.features` returns the
per-example vectors whose inner products are the scores.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import scoring
from .capture import has_bias, is_conv1d, layer_shape, tracked_modules, tracking_summary
from .data import _check_batch_size
from .layers import DenseLayer, LayerBatch, Projected, decode
from .ops import _common as c
from .ops.jl_project import jl_project, phi_block, seed_key
from .ops.kron_project import kron_project
from .store import Store, hash_state

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

    ``init="pca"`` (LoGra): ``P_in`` / ``P_out`` are instead the top ``k_in`` / ``k_out``
    eigenvectors of each layer's ``E[a aᵀ]`` / ``E[g gᵀ]`` over the training tokens, fitted per
    checkpoint by :meth:`TracIn.fit_projection` (``min(k, d)`` columns when ``k > d``); the
    scores are then biased (a truncation) but far less noisy. ``seed`` is unused there.
    """
    k_in: int
    k_out: int
    seed: int = 0
    init: str = "random"

    def __post_init__(self):
        for name in ("k_in", "k_out"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KroneckerProjection: {name} must be a positive int, got {v!r}")
        if self.init not in ("random", "pca"):
            raise ValueError(f"KroneckerProjection: init must be 'random' or 'pca', got "
                             f"{self.init!r}")
        seed_key(self.seed)

    def matrices(self, layer: int, din: int, dout: int, device=None, dtype=torch.float32):
        """``(P_in [din, k_in], P_out [dout, k_out])`` of layer number ``layer`` (random init)."""
        if self.init != "random":
            raise ValueError("KroneckerProjection(init='pca'): the matrices are fitted on data by "
                             "TracIn.fit_projection(train)")
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
    optim: object = None  # an optimizer state dict or a path (preconditioner="adam")


def _check_lr(lr, label):
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(float(lr)):
        raise ValueError(f"checkpoints: the learning rate of {label} must be a finite number, "
                         f"got {lr!r}")
    return float(lr)


def _check_source(i, src, what):
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoints[{i}]: {what} file {path!r} does not exist")
        return f"{what} file {path!r}"
    if isinstance(src, dict):
        return f"checkpoints[{i}] ({what} dict)"
    raise TypeError(f"checkpoints[{i}]: expected a {what} dict or a file path, got "
                    f"{type(src).__name__}")


def _normalize_checkpoints(checkpoints, adam: bool) -> List[_Checkpoint]:
    shape = "(state_dict_or_path, learning_rate" + (", optimizer_state_dict_or_path)" if adam
                                                     else ")")
    if checkpoints is None:
        if adam:
            raise ValueError(f"preconditioner='adam' needs checkpoints=[{shape}, ...]: the "
                             "optimizer's moments of each checkpoint")
        return [_Checkpoint(None, 1.0, "the current weights")]
    if isinstance(checkpoints, (str, os.PathLike, dict)) or not isinstance(checkpoints, Sequence):
        raise TypeError(f"checkpoints must be a list of {shape} tuples")
    if len(checkpoints) == 0:
        raise ValueError("checkpoints: empty list; pass None to use the current weights")
    out = []
    for i, item in enumerate(checkpoints):
        n = 3 if adam else 2
        if not isinstance(item, (tuple, list)) or len(item) != n:
            hint = (" (preconditioner='adam' needs the optimizer state as third item)" if adam
                    else " (an optimizer state is used only with preconditioner='adam')")
            raise TypeError(f"checkpoints[{i}] must be a {shape} tuple, got "
                            f"{type(item).__name__}"
                            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
                            + hint)
        src, lr = item[0], item[1]
        label = _check_source(i, src, "checkpoint")
        optim = None
        if adam:
            optim = item[2]
            if isinstance(optim, torch.optim.Optimizer):
                optim = optim.state_dict()
            _check_source(i, optim, "optimizer state")
        out.append(_Checkpoint(src, _check_lr(lr, label), label, optim))
    return out


def _load_file(src, label):
    try:
        return torch.load(os.fspath(src), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{label} could not be loaded: {type(exc).__name__}: {exc}") from exc


def _load_state(ck: _Checkpoint, model: nn.Module) -> dict:
    """The checkpoint's state dict, checked against the model: every trainable parameter
    (``requires_grad``) must be there; frozen parameters and buffers may be left out (adapter
    checkpoints: the model's own values are used); unknown keys and shape mismatches are errors."""
    sd = ck.source
    if isinstance(sd, (str, os.PathLike)):
        if not os.path.isfile(os.fspath(sd)):
            raise FileNotFoundError(f"{ck.label} does not exist")
        sd = _load_file(sd, ck.label)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{ck.label} does not hold a state dict (got {type(sd).__name__})")
    ref = model.state_dict()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in sd]
    unexpected = [k for k in sd if k not in ref]
    shapes = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(ref[k].shape)}" for k in ref
              if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].shape != ref[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}" + (" ..." if len(missing) > 8 else "")
                         + " (trainable parameters; a checkpoint may leave out only frozen ones)")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}"
                         + (" ..." if len(unexpected) > 8 else ""))
        if shapes:
            parts.append(f"shape mismatches [{'; '.join(shapes[:8])}]")
        hint = ("; peft adapter files drop the adapter name ('.default'): load them into the "
                "model with peft and pass model.state_dict()"
                if unexpected and any(".default." in k for k in missing) else "")
        raise ValueError(f"{ck.label} does not match the model: " + ", ".join(parts) + hint)
    return sd


def _param_names(module_name: str, module: nn.Module):
    """``[(parameter name, its columns of D)]``: the weight, then the bias column if tracked."""
    pre = f"{module_name}." if module_name else ""
    out = [(pre + "weight", "weight")]
    if has_bias(module):
        out.append((pre + "bias", "bias"))
    return out


def _as_matrix(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as the ``[dout, din]`` columns of ``D`` (Conv1D: ``[din, dout]``)."""
    return w.T if is_conv1d(module) else w.reshape(w.shape[0], -1)


def _adam_moments(ck: _Checkpoint, model: nn.Module, modules) -> Dict[str, dict]:
    """Per tracked module: ``m, v [dout, din]`` and ``b1, b2, c1, c2, eps [1, din]`` (per column:
    a weight and its bias may sit in different parameter groups) from the optimizer state dict.

    Parameters are matched by name when the param groups carry ``param_names`` (an optimizer
    built over ``model.named_parameters()``), else by position: the state dict's ids in group
    order are assumed to follow ``model.named_parameters()`` restricted to ``requires_grad``
    parameters (an optimizer built over ``[p for p in model.parameters() if p.requires_grad]``).
    Every matched moment's shape is checked against its parameter.
    """
    label = f"the optimizer state of {ck.label}"
    st = _load_file(ck.optim, label) if isinstance(ck.optim, (str, os.PathLike)) else ck.optim
    if not isinstance(st, dict) or "state" not in st or "param_groups" not in st:
        raise ValueError(f"{label} is not an optimizer state_dict() (needs 'state' and "
                         "'param_groups')")
    groups = st["param_groups"]
    params = OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    ids = [(g, pid) for g in groups for pid in g["params"]]
    if all("param_names" in g for g in groups):
        names = [n for g in groups for n in g["param_names"]]
        known = dict(model.named_parameters())         # frozen ones simply have no moments
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{label}: param_names {unknown[:8]} are not parameters of the "
                             "model (names as in model.named_parameters())")
        params = known
    else:
        if len(ids) != len(params):
            raise ValueError(f"{label} has {len(ids)} parameters, the model has {len(params)} "
                             "trainable ones: the optimizer state must follow "
                             "model.named_parameters() (requires_grad only) in order; build the "
                             "optimizer over model.named_parameters() to match by name")
        names = list(params)
    by_name = {n: (g, pid) for n, (g, pid) in zip(names, ids)}
    for n, (g, pid) in by_name.items():
        s = st["state"].get(pid, st["state"].get(str(pid)))
        if s is not None and "exp_avg" in s and tuple(s["exp_avg"].shape) != tuple(params[n].shape):
            raise ValueError(f"{label}: the moments of parameter {pid} have shape "
                             f"{tuple(s['exp_avg'].shape)}, matched to {n!r} of shape "
                             f"{tuple(params[n].shape)}: the optimizer's parameter order does not "
                             "follow model.named_parameters()")
    out = {}
    for mname, mod in modules.items():
        ms, vs, hyper = [], [], []
        for pname, kind in _param_names(mname, mod):
            if pname not in by_name:
                raise ValueError(f"{label} has no entry for the tracked parameter {pname!r}")
            g, pid = by_name[pname]
            s = st["state"].get(pid, st["state"].get(str(pid)))
            if not s or "exp_avg" not in s or "exp_avg_sq" not in s:
                raise ValueError(f"{label} holds no Adam moments (exp_avg, exp_avg_sq) for "
                                 f"{pname!r}: was it trained with Adam / AdamW?")
            if g.get("amsgrad") or g.get("maximize"):
                raise ValueError(f"{label}: amsgrad / maximize Adam is not supported ({pname!r})")
            p = params[pname]
            m, v = s["exp_avg"].to(p.device), s["exp_avg_sq"].to(p.device)
            if kind == "weight":
                m, v = _as_matrix(mod, m), _as_matrix(mod, v)
            else:
                m, v = m[:, None], v[:, None]
            b1, b2 = (float(b) for b in g["betas"])
            t = float(s["step"]) + 1.0         # the step optimizer.step() would take next
            ms.append(m)
            vs.append(v)
            hyper.append(torch.tensor([[b1, b2, 1 - b1 ** t, 1 - b2 ** t, float(g["eps"])]],
                                      dtype=torch.float64).expand(m.shape[1], 5))
        h = torch.cat(hyper, 0).T.to(p.device)[:, None, :]       # [5, 1, din]
        out[mname] = dict(m=torch.cat(ms, 1), v=torch.cat(vs, 1), b1=h[0], b2=h[1], c1=h[2],
                          c2=h[3], eps=h[4])
    return out


def adam_direction(D: torch.Tensor, mo: dict) -> torch.Tensor:
    """``m̂/(√v̂ + ε)`` per example: ``m̂ = (β1·m + (1−β1)·D)/(1−β1^t)``,
    ``v̂ = (β2·v + (1−β2)·D²)/(1−β2^t)``, t = stored step + 1; ``D [B, dout, din]``."""
    dt = D.dtype
    f = {k: x.to(dt) for k, x in mo.items()}
    m = (f["b1"] * f["m"] + (1 - f["b1"]) * D) / f["c1"]
    v = (f["b2"] * f["v"] + (1 - f["b2"]) * D * D) / f["c2"]
    return m / (v.sqrt() + f["eps"])


def _proj_spec(proj) -> Optional[dict]:
    if isinstance(proj, KroneckerProjection):
        d = {"type": "kronecker", "k_in": proj.k_in, "k_out": proj.k_out, "seed": proj.seed}
        if proj.init != "random":
            d["init"] = proj.init
        return d
    if isinstance(proj, RandomProjection):
        return {"type": "random", "dim": proj.dim, "seed": proj.seed, "kind": proj.kind}
    return None


def _is_pca(proj) -> bool:
    return isinstance(proj, KroneckerProjection) and proj.init == "pca"


def _top_eigenvectors(C: torch.Tensor, k: int) -> torch.Tensor:
    """``[d, min(k, d)]`` float32: the eigenvectors of the largest eigenvalues of ``C``, each
    signed so that its largest-magnitude entry is positive."""
    V = torch.linalg.eigh(C.cpu())[1].flip(1)[:, :min(k, C.shape[0])]
    top = V.gather(0, V.abs().argmax(0, keepdim=True))
    return (V * torch.where(top < 0, -1.0, 1.0).to(V.dtype)).float().contiguous()


def _flat(records) -> torch.Tensor:
    """``[B, K]`` float32 (CPU): the records of one batch flattened and concatenated."""
    cols = []
    for rec in records.values():
        X = rec.X if isinstance(rec, Projected) else \
            rec.D if isinstance(rec, DenseLayer) else rec.dense()
        cols.append(X.detach().flatten(1).float().cpu())
    return torch.cat(cols, 1)


_FORMAT = "fastinf-tracin"


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
            current weights with learning rate 1. A state dict may hold only the trainable
            parameters (adapters); every ``requires_grad`` parameter must be there. With
            ``preconditioner="adam"``: ``(state, learning_rate, optimizer_state_dict_or_path)``.
            The model's own weights are restored after every pass.
        modules: names or module objects to track (default: all supported layers).
        projection: None (exact), :class:`KroneckerProjection` or :class:`RandomProjection`.
        progress: show progress bars.
        token_mask_fn: ``token_mask_fn(batch) -> [B, T]`` bool, False for padding tokens.
        backend: kernel backend for the ops (None: fastest usable).
        preconditioner: None (SGD: plain gradients) or ``"adam"`` (LESS): training gradients
            become the Adam update direction ``m̂/(√v̂+ε)`` from each checkpoint's optimizer
            moments, query gradients stay plain (docs/tracin.md gives the exact formula).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, checkpoints=None, modules=None,
                 projection=None, progress: bool = True, token_mask_fn: Optional[Callable] = None,
                 backend: Optional[str] = None, preconditioner: Optional[str] = None):
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
        if preconditioner not in (None, "adam"):
            raise ValueError(f"preconditioner must be None or 'adam', got {preconditioner!r}")
        self.preconditioner = preconditioner
        self.checkpoints = _normalize_checkpoints(checkpoints, preconditioner == "adam")
        self.projection = projection
        self.progress = progress
        self.token_mask_fn = token_mask_fn
        self.backend = backend
        self._kron_mats: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._pca: Dict[str, torch.Tensor] = {}     # "c<k>/<module>/in|out" -> P (fit_projection)
        self._active: Optional[int] = None          # the checkpoint the model is at (in _at)
        self._moments: Optional[dict] = None        # its Adam moments per module

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the scores (float32)."""
        return torch.float32

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _at(self, i: int):
        """The model at checkpoint ``i`` (only the keys the checkpoint holds are swapped and
        restored), with its Adam moments loaded when preconditioning."""
        ck = self.checkpoints[i]
        backup = None
        if ck.source is not None:
            sd = _load_state(ck, self.model)
            own = self.model.state_dict()
            backup = {k: own[k].detach().clone() for k in sd}
            self.model.load_state_dict(sd, strict=False)
        try:
            self._active = i
            if self.preconditioner == "adam":
                self._moments = _adam_moments(ck, self.model, self.modules)
            yield
        finally:
            self._active, self._moments = None, None
            if backup is not None:
                self.model.load_state_dict(backup, strict=False)

    def _kron(self, li: int, name: str, lb: LayerBatch):
        """``(P_in, P_out)`` of layer ``li`` at the active checkpoint (random or fitted PCA)."""
        proj, device = self.projection, lb.A.device
        if proj.init == "pca":
            # outside a checkpoint's context (a store's layout probe): the first checkpoint's
            key = f"c{self._active or 0}/{name}"
            if f"{key}/in" not in self._pca:
                raise ValueError("KroneckerProjection(init='pca') is not fitted: call "
                                 "TracIn.fit_projection(train) first")
            return self._pca[f"{key}/in"].to(device), self._pca[f"{key}/out"].to(device)
        key = (li, lb.din, lb.dout, device)
        if key not in self._kron_mats:
            self._kron_mats[key] = proj.matrices(li, lb.din, lb.dout, device=device)
        return self._kron_mats[key]

    def _project(self, factors, precondition: bool = False) -> torch.Tensor:
        """Feature vectors ``[B, K]`` of one batch (K summed over layers): the projection of the
        per-example gradients (Adam directions when ``precondition``), or the flattened dense
        gradients without a projection."""
        proj = self.projection
        kron = isinstance(proj, KroneckerProjection)
        if kron and not precondition:     # never forms D_n
            return torch.cat([kron_project(lb.A.detach().float(), lb.G.detach().float(),
                                           *self._kron(li, n, lb), a_mask=lb.mask,
                                           backend=self.backend).flatten(1)
                              for li, (n, lb) in enumerate(factors.items())], 1)
        # dense per-example gradients, materialised in example tiles
        B = len(next(iter(factors.values())))
        p = sum(lb.dout * lb.din for lb in factors.values())
        out = []
        nb = c.chunk(B, p * 8.0)
        moments = self._moments
        if precondition and moments is None:     # outside _at (a store's layout probe)
            moments = _adam_moments(self.checkpoints[0], self.model, self.modules)
        for b0 in range(0, B, nb):
            ys = []
            for li, (n, lb) in enumerate(factors.items()):
                mask = None if lb.mask is None else lb.mask[b0:b0 + nb]
                dt = torch.promote_types(lb.A.dtype, torch.float32)
                D = LayerBatch(lb.A[b0:b0 + nb], lb.G[b0:b0 + nb], mask).to(dt).dense()
                if precondition:
                    D = adam_direction(D, moments[n])
                if kron:
                    P_in, P_out = self._kron(li, n, lb)
                    D = P_out.T.to(dt) @ D @ P_in.to(dt)
                ys.append(D.flatten(1).float())
            X = torch.cat(ys, 1)
            if isinstance(proj, RandomProjection):
                X = jl_project(X, proj.dim, seed=proj.seed, kind=proj.kind, backend=self.backend)
            out.append(X)
        return torch.cat(out, 0)

    # ------------------------------------------------------------------ scoring protocol
    # (fastinf.scoring runs every loop; see docs/architecture.md)
    def terms(self):
        return [(self, ck.lr, functools.partial(self._at, i))
                for i, ck in enumerate(self.checkpoints)]

    def train_layers(self, layers):
        """The factors themselves, or ``{"proj": Projected [B, K]}`` with a projection or the
        Adam preconditioner (then the flattened or projected Adam directions)."""
        adam = self.preconditioner == "adam"
        if self.projection is None and not adam:
            return layers
        return {"proj": Projected(self._project(layers, precondition=adam))}

    def query_layers(self, layers):
        """Plain (SGD) query gradients: the factors, or ``{"proj": Projected [Q, K]}``."""
        if self.projection is None and self.preconditioner is None:
            return {n: lb.to(torch.float32) for n, lb in layers.items()}
        return {"proj": Projected(self._project(layers))}

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
            entry = {"lr": ck.lr, "weights_sha256": hash_state(sd)}
            if self.preconditioner == "adam":
                mo = _adam_moments(ck, self.model, self.modules)
                entry["adam_sha256"] = hash_state({f"{n}/{k}": t for n, d in mo.items()
                                                   for k, t in d.items()})
            cks.append(entry)
        spec = {"kind": "tracin", "checkpoints": cks, "projection": _proj_spec(self.projection)}
        if self.preconditioner is not None:
            spec["preconditioner"] = self.preconditioner
        if _is_pca(self.projection):
            self._require_pca("store_spec")
            spec["projection"]["pca_sha256"] = hash_state(self._pca)
        return spec

    def _require_pca(self, what):
        want = [f"c{c}/{n}/{s}" for c in range(len(self.checkpoints)) for n in self.modules
                for s in ("in", "out")]
        if any(k not in self._pca for k in want):
            raise ValueError(f"{what}: KroneckerProjection(init='pca') is not fitted: call "
                             "TracIn.fit_projection(train) first (or TracIn.load a saved one)")

    # ------------------------------------------------------------------ fitting, features, saving
    def fit_projection(self, train, batch_size: int = 64) -> "TracIn":
        """Fits ``KroneckerProjection(init="pca")``: per checkpoint and tracked layer, ``P_in`` =
        the top ``k_in`` eigenvectors of ``Σ a aᵀ`` and ``P_out`` = the top ``k_out`` of
        ``Σ g gᵀ`` over every (unmasked) token of ``train`` (one pass per checkpoint; eigenvector
        signs fixed so the largest entry is positive, so refits are identical). Returns self."""
        proj = self.projection
        if not _is_pca(proj):
            raise ValueError("fit_projection: only KroneckerProjection(init='pca') is fitted on "
                             f"data; this TracIn's projection is {proj!r}")
        _check_batch_size(batch_size)
        pca = {}
        for ci, (m, _, at) in enumerate(self.terms()):
            cov: Dict[str, List[torch.Tensor]] = {}
            with at():
                for _, layers in scoring._pass(m, train, batch_size, "train"):
                    for n, lb in layers.items():   # masked tokens are zero rows of A and G
                        A = lb.A.detach().double().flatten(0, 1)
                        G = lb.G.detach().double().flatten(0, 1)
                        if n in cov:
                            cov[n][0] += A.T @ A
                            cov[n][1] += G.T @ G
                        else:
                            cov[n] = [A.T @ A, G.T @ G]
            for n, (caa, cgg) in cov.items():
                pca[f"c{ci}/{n}/in"] = _top_eigenvectors(caa, proj.k_in)
                pca[f"c{ci}/{n}/out"] = _top_eigenvectors(cgg, proj.k_out)
        self._pca = pca
        return self

    def features(self, data, batch_size: int = 64, *, side: str = "train") -> torch.Tensor:
        """Per-example feature vectors ``[N, C·K]`` float32 (CPU) whose inner products are the
        scores: ``features(q, side="query") @ features(train).T == pairwise_scores(q, train)``.

        Per checkpoint c, ``K`` columns ``√η_c · x_n^c`` in checkpoint order, ``x`` being the
        projected gradient (``K`` = the projection's size), or without a projection the
        flattened per-layer gradients ``D_n [dout, din]`` (row-major, bias last column,
        tracked-module order; ``K`` = the tracked parameter count). ``side="train"``: training
        gradients (Adam directions with ``preconditioner="adam"``); ``side="query"``: plain
        gradients. ``data`` may be a :class:`fastinf.GradientStore` built with this TracIn
        (train side: the stored vectors, no gradient pass). No normalisation is applied; for
        LESS's per-checkpoint cosines reshape to ``[N, C, K]``. Needs learning rates ≥ 0.
        """
        if side not in ("train", "query"):
            raise ValueError(f"features: side must be 'train' or 'query', got {side!r}")
        _check_batch_size(batch_size)
        neg = [ck.label for ck in self.checkpoints if ck.lr < 0]
        if neg:
            raise ValueError(f"features: the vectors are scaled by √η; {neg} have a negative "
                             "learning rate")
        if isinstance(data, Store):
            if side != "train":
                raise ValueError("features: a store holds the training side only; pass the query "
                                 "data itself for side='query'")
            scoring.check_store(data, self)
            blocks = []
            for i in range(len(data.shards)):
                t = data.read_shard(i)
                blocks.append(torch.cat([math.sqrt(w) * _flat(decode(
                    t, f"c{ci}", self.modules, data.layouts, "cpu"))
                    for ci, (_, w, _) in enumerate(self.terms())], 1))
            return torch.cat(blocks, 0)
        cols = []
        for m, w, at in self.terms():
            rows = []
            with at():
                for _, layers in scoring._pass(m, data, batch_size, side):
                    recs = m.train_layers(layers) if side == "train" else m.query_layers(layers)
                    rows.append(_flat(recs))
            cols.append(math.sqrt(w) * torch.cat(rows, 0))
        return torch.cat(cols, 1)

    def state_dict(self) -> dict:
        """The projection's settings and fitted PCA matrices (what :meth:`load` restores)."""
        if _is_pca(self.projection):
            self._require_pca("state_dict")
        return dict(format=_FORMAT, version=1, projection=_proj_spec(self.projection),
                    n_checkpoints=len(self.checkpoints),
                    pca={k: v.cpu() for k, v in self._pca.items()})

    def save(self, path) -> None:
        """Writes :meth:`state_dict` (the fitted PCA projection) with ``torch.save``."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, model: nn.Module, loss_fn: Callable, **kwargs) -> "TracIn":
        """A TracIn with the projection (and fitted PCA matrices) saved by :meth:`save`;
        ``kwargs`` as in the constructor (``projection`` comes from the file; the checkpoints
        and tracked modules must be the ones it was fitted with: same count, names, shapes)."""
        st = _load_file(path, f"TracIn file {os.fspath(path)!r}")
        if not isinstance(st, dict) or st.get("format") != _FORMAT or st.get("version") != 1:
            raise ValueError(f"{path}: not a fastinf TracIn file (version 1)")
        spec = dict(st["projection"] or {})
        kind = spec.pop("type", None)
        proj = None if kind is None else (KroneckerProjection(**spec) if kind == "kronecker"
                                          else RandomProjection(**spec))
        if kwargs.get("projection", proj) != proj:
            raise ValueError(f"TracIn.load: {path} holds projection {proj!r}, got "
                             f"projection={kwargs['projection']!r}")
        kwargs["projection"] = proj
        tr = cls(model, loss_fn, **kwargs)
        if st["pca"]:
            if st["n_checkpoints"] != len(tr.checkpoints):
                raise ValueError(f"TracIn.load: {path} was fitted on {st['n_checkpoints']} "
                                 f"checkpoints, got {len(tr.checkpoints)}")
            tr._pca = dict(st["pca"])
            tr._require_pca("TracIn.load")
            for ci in range(len(tr.checkpoints)):
                for n, mod in tr.modules.items():
                    dout, din = layer_shape(mod)
                    P_in, P_out = tr._pca[f"c{ci}/{n}/in"], tr._pca[f"c{ci}/{n}/out"]
                    if P_in.shape[0] != din or P_out.shape[0] != dout:
                        raise ValueError(f"TracIn.load: module {n!r} has gradient shape "
                                         f"{(dout, din)}; {path} holds P_in {tuple(P_in.shape)}, "
                                         f"P_out {tuple(P_out.shape)}")
        return tr

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
