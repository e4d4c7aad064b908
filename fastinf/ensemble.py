"""``fastinf.Ensemble``: influence averaged over several fitted methods (see docs/selection.md).

Scores of independently trained models (or of several checkpoints) are noisy in different ways;
their average attributes better (on the digits LDS benchmark, five seeds lift EK-FAC's LDS by
about 0.05). The ensemble's scores are the weighted sum of its members' raw scores,
``Σ_m w_m · score_m`` (default ``w_m = 1/M``, the mean), and its self-influence likewise
``Σ_m w_m · self_m``. Raw averaging is what the benchmark measured best (dividing each member by
the RMS of its self-influence or of its scores gave the same LDS within 0.002) and it depends on
no data. Members of different kinds (TracIn and EK-FAC) have scores on different scales: then
build it with :meth:`Ensemble.balanced`, which sets ``w_m = 1 / (M · RMS of self_m on train)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .scoring import GradientStore
from .selection import _is_store_list, _length, _query_batch, query_chunks

__all__ = ["Ensemble"]


class Ensemble:
    """The ``pairwise_scores`` / ``self_scores`` / ``top_influences`` interface over several
    fitted methods (``EKFAC``, ``TracIn``, another ``Ensemble``), combined as
    ``Σ_m weights[m] · score_m`` (default weights ``1/M``).

    ``train`` is data shared by all members (each member runs its own pass over it), or a list
    of :class:`fastinf.GradientStore`, one per member in the order of ``methods`` (each built
    with its member). Scores are float32 on the CPU, summed in float64.
    """

    def __init__(self, methods: Sequence, weights: Optional[Sequence[float]] = None):
        methods = list(methods) if isinstance(methods, (list, tuple)) else methods
        if not isinstance(methods, list) or not methods:
            raise ValueError(f"methods must be a non-empty list of fitted methods, got {methods!r}")
        for i, m in enumerate(methods):
            if not (callable(getattr(m, "pairwise_scores", None))
                    and callable(getattr(m, "self_scores", None))):
                raise TypeError(f"methods[{i}] ({type(m).__name__}) has no pairwise_scores / "
                                "self_scores: expected a fitted fastinf.EKFAC, TracIn or Ensemble")
        if weights is None:
            weights = [1.0 / len(methods)] * len(methods)
        weights = [float(w) for w in weights]
        if len(weights) != len(methods):
            raise ValueError(f"weights: one per method expected ({len(methods)}), got "
                             f"{len(weights)}")
        bad = [w for w in weights if not math.isfinite(w) or w <= 0]
        if bad:
            raise ValueError(f"weights must be finite and positive, got {weights}")
        self.methods, self.weights = methods, weights

    def __len__(self) -> int:
        return len(self.methods)

    def __repr__(self) -> str:
        kinds = ", ".join(type(m).__name__ for m in self.methods)
        return f"Ensemble([{kinds}], weights={[round(w, 6) for w in self.weights]})"

    @classmethod
    def balanced(cls, methods: Sequence, train, batch_size: int = 64) -> "Ensemble":
        """An ensemble whose members count equally whatever their scale: ``w_m = 1/(M · r_m)``
        with ``r_m`` the RMS of member m's self-influence on ``train`` (data or a list of
        stores). The weights are then fixed: later calls do not depend on the data they get."""
        methods = list(methods)
        trains = cls(methods)._trains(train)
        rms = []
        for i, (m, t) in enumerate(zip(methods, trains)):
            s = m.self_scores(t, batch_size=batch_size).double()
            r = float(s.pow(2).mean().sqrt())
            if not math.isfinite(r) or r <= 0:
                raise ValueError(f"Ensemble.balanced: methods[{i}] has self-influence RMS {r} on "
                                 "train; cannot scale it")
            rms.append(r)
        return cls(methods, [1.0 / (len(methods) * r) for r in rms])

    # ------------------------------------------------------------------ train per member
    def _trains(self, train) -> list:
        if _is_store_list(train):
            if len(train) != len(self.methods):
                raise ValueError(f"train: one GradientStore per member expected "
                                 f"({len(self.methods)}), got {len(train)}")
            sizes = [len(s) for s in train]
            if len(set(sizes)) != 1:
                raise ValueError(f"train: the stores hold different numbers of examples {sizes}")
            return train
        if isinstance(train, GradientStore):
            raise ValueError("train: a GradientStore belongs to the one method it was built with; "
                             "give an Ensemble a list of stores, one per member (in the order of "
                             "its methods), or the data")
        return [train] * len(self.methods)

    # ------------------------------------------------------------------ public API
    def pairwise_scores(self, query, train, batch_size: int = 64, **kwargs) -> torch.Tensor:
        """``[n_query, n_train]`` float32 ``Σ_m w_m · score_m``; ``kwargs`` (e.g.
        ``measurement_fn``) go to every member."""
        out = None
        for w, m, t in zip(self.weights, self.methods, self._trains(train)):
            s = w * m.pairwise_scores(query, t, batch_size=batch_size, **kwargs).double().cpu()
            out = s if out is None else out + s
        return out.float()

    def self_scores(self, train, batch_size: int = 64) -> torch.Tensor:
        """``[n_train]`` float32 ``Σ_m w_m · self_m``."""
        out = None
        for w, m, t in zip(self.weights, self.methods, self._trains(train)):
            s = w * m.self_scores(t, batch_size=batch_size).double().cpu()
            out = s if out is None else out + s
        return out.float()

    def top_influences(self, query, train, k: int = 10, largest: bool = True,
                       train_indices=None, batch_size: int = 64,
                       query_batch: Optional[int] = None, **kwargs):
        """``(values [n_query, k], indices [n_query, k])`` of the ensemble's scores, as
        :meth:`fastinf.EKFAC.top_influences` (``train_indices``: one index tensor for all queries
        or a list of one per query; missing candidates give ``nan`` / ``-1``). Queries are scored
        ``query_batch`` at a time (default: 256 MiB of ``[rows, n_train]`` scores), so memory is
        ``query_batch × n_train`` (the top-k of a sum needs every member's full row)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        n, nq = _length(self._trains(train)[0]), _length(query)
        allowed = _allowed(train_indices, nq, n)
        fill = float("-inf") if largest else float("inf")
        vals, idxs = [], []
        for q0, q in query_chunks(query, _query_batch(query_batch, n)):
            S = self.pairwise_scores(q, train, batch_size=batch_size, **kwargs)
            if allowed is not None:
                S = S.masked_fill(~allowed[q0:q0 + S.shape[0]] if len(allowed) > 1
                                  else ~allowed, fill)
            if S.shape[1] < k:
                S = torch.cat([S, torch.full((S.shape[0], k - S.shape[1]), fill)], 1)
            v, i = torch.topk(S, k, dim=1, largest=largest)
            missing = (v == fill) | (i >= n)
            vals.append(v.masked_fill(missing, float("nan")))
            idxs.append(i.masked_fill(missing, -1))
        return torch.cat(vals), torch.cat(idxs)


def _allowed(train_indices, n_query: int, n: int) -> Optional[torch.Tensor]:
    """Bool ``[1 | n_query, n]`` candidate mask from ``train_indices`` (None: all)."""
    if train_indices is None:
        return None
    per_query = not isinstance(train_indices, torch.Tensor)
    if per_query and len(train_indices) != n_query:
        raise ValueError(f"train_indices: one index tensor per query expected ({n_query}), got "
                         f"{len(train_indices)}")
    lists = train_indices if per_query else [train_indices]
    mask = torch.zeros(len(lists), n, dtype=torch.bool)
    for q, t in enumerate(lists):
        t = torch.as_tensor(t, dtype=torch.int64).reshape(-1)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"train_indices: values must lie in [0, {n}), got "
                             f"[{int(t.min())}, {int(t.max())}]")
        mask[q, t] = True
    return mask
