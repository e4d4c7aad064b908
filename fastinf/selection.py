"""Acting on influence scores: select training data for a target, find harmful and suspicious
examples (see docs/selection.md).

Every function takes a fitted method — :class:`fastinf.EKFAC`, :class:`fastinf.TracIn`,
:class:`fastinf.Ensemble`, or anything with their ``pairwise_scores(query, train, batch_size=)``
and ``self_scores(train, batch_size=)`` — and ``train`` as data or a
:class:`fastinf.GradientStore` built with that method (for an ensemble: one store per member, in a
list). Each returns ``(indices, scores)``: the chosen training examples, best first (ties: lower
index first), and the score each was chosen by. Exactly one of ``k`` (a count) and ``fraction``
(of the training set, rounded, at least one example) says how many.

Memory: the target / validation examples are scored in batches of ``query_batch`` rows (default:
as many as fit in 256 MiB of ``[rows, n_train]`` float32 scores), and reduced to one float64
value per training example at once, so memory is ``query_batch × n_train`` plus ``O(n_train)``.
Each batch is one pass over ``train`` (one read of the store, or a training-gradient pass over
data): the default makes it a single pass while ``n_target × n_train ≤ 67M`` (e.g. 1000 targets
against 67k training examples); beyond that, raise ``query_batch`` if memory allows, or score a
store, where each extra pass is only a read of its shards.

Sign convention (fastinf's and Kronfluence's): a positive score means that up-weighting the
training example lowers the query's loss (it helps).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from .data import num_examples
from .scoring import GradientStore, subset

__all__ = ["for_target", "harmful", "suspicious"]

_BUDGET_BYTES = 256 << 20


# --------------------------------------------------------------------------- data helpers
def _is_store_list(train) -> bool:
    return isinstance(train, list) and bool(train) and all(isinstance(t, GradientStore)
                                                           for t in train)


def _length(data) -> int:
    """Number of examples of data (any form fastinf accepts), a store or a list of stores."""
    return len(data[0]) if _is_store_list(data) else num_examples(data)


def _query_batch(query_batch: Optional[int], n_train: int) -> int:
    if query_batch is None:
        return max(1, _BUDGET_BYTES // (4 * max(n_train, 1)))
    if isinstance(query_batch, bool) or not isinstance(query_batch, int) or query_batch < 1:
        raise ValueError(f"query_batch must be a positive int or None, got {query_batch!r}")
    return query_batch


def query_chunks(data, rows: int) -> Iterator[Tuple[int, object]]:
    """``(offset, data[offset:offset+rows])`` over ``data``; the data itself when it fits."""
    n = _length(data)
    if n <= rows:
        yield 0, data
        return
    for start in range(0, n, rows):
        yield start, subset(data, start, min(n, start + rows))


# --------------------------------------------------------------------------- counts
def _count_request(fn: str, k, fraction):
    """Validates ``k`` / ``fraction`` (exactly one, right type) before any work."""
    if (k is None) == (fraction is None):
        raise ValueError(f"{fn}: give exactly one of k= (a number of examples) or fraction= (of "
                         f"the training set), got k={k!r}, fraction={fraction!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{fn}: k must be a positive int, got {k!r}")
    if fraction is not None and (isinstance(fraction, bool)
                                 or not isinstance(fraction, (int, float))
                                 or not 0.0 < fraction <= 1.0):
        raise ValueError(f"{fn}: fraction must be a number in (0, 1], got {fraction!r}")


def _count(fn: str, k, fraction, n: int) -> int:
    if k is not None:
        if k > n:
            raise ValueError(f"{fn}: k={k} is more than the {n} training examples")
        return k
    return min(n, max(1, round(fraction * n)))


def _pick(scores: torch.Tensor, count: int, descending: bool):
    order = torch.sort(scores, descending=descending, stable=True).indices[:count]
    return order, scores[order]


def _scores_of(method, query, train, batch_size, rows):
    """``(offset, [rows, n_train] float64)`` blocks of ``method.pairwise_scores``."""
    for q0, q in query_chunks(query, rows):
        yield q0, method.pairwise_scores(q, train, batch_size=batch_size).double()


def _norms(method, data, batch_size, what) -> torch.Tensor:
    if what == "target" and getattr(method, "preconditioner", None) is not None:
        # an asymmetric inner product (TracIn with preconditioner="adam": Adam directions on the
        # training side, plain gradients on the query side): self_scores measures the training
        # side's norm, so the target's norm comes from its query-side features
        s = method.features(data, batch_size, side="query").double().pow(2).sum(1)
    else:
        s = method.self_scores(data, batch_size=batch_size).double().cpu()
    if bool((s < 0).any()):
        i = int(torch.argmin(s))
        raise ValueError(f"normalize='cosine' needs non-negative self-influence (it is the squared "
                         f"norm of a gradient in the method's inner product), but {what} example "
                         f"{i} has {float(s[i]):.4g}; are learning rates or ensemble weights "
                         "negative? Use normalize=None")
    return s.sqrt()


# --------------------------------------------------------------------------- public API
def for_target(method, train, target, *, k: Optional[int] = None,
               fraction: Optional[float] = None, normalize: Optional[str] = "cosine",
               aggregate: str = "max", batch_size: int = 64, query_batch: Optional[int] = None):
    """The training examples most helpful to ``target`` (LESS-style targeted selection).

    ``target``: one dataset (its examples are the units) or a list of datasets, the subtasks (a
    subtask's score is the mean over its examples; a list of tensors is one dataset, as
    everywhere in fastinf). ``normalize="cosine"`` divides each score by the norms of both
    gradients in the method's inner product, ``score(q, n) / sqrt(self(q) · self(n))`` (for
    TracIn the learning-rate weighted gradient dot product, for EK-FAC the ``H⁻¹`` inner product);
    ``None`` keeps raw scores. ``aggregate``: ``"max"`` (LESS) or ``"mean"`` over the units.
    Returns ``(indices, scores)``, highest aggregated score first.
    """
    fn = "for_target"
    _count_request(fn, k, fraction)
    if normalize not in ("cosine", None):
        raise ValueError(f"{fn}: normalize must be 'cosine' or None, got {normalize!r}")
    if aggregate not in ("max", "mean"):
        raise ValueError(f"{fn}: aggregate must be 'max' or 'mean', got {aggregate!r}")
    n = _length(train)
    count = _count(fn, k, fraction, n)
    subtasks = isinstance(target, list) and bool(target) and not all(
        isinstance(t, torch.Tensor) for t in target)
    units = target if subtasks else [target]
    rows = _query_batch(query_batch, n)
    train_norm = _norms(method, train, batch_size, "training") if normalize else None
    agg = torch.full((n,), float("-inf") if aggregate == "max" else 0.0, dtype=torch.float64)
    n_units = 0
    for t, data in enumerate(units):
        m = _length(data)
        if m == 0:
            raise ValueError(f"{fn}: target{f'[{t}]' if subtasks else ''} is empty")
        q_norm = _norms(method, data, batch_size, "target") if normalize else None
        unit_sum = torch.zeros(n, dtype=torch.float64)
        for q0, S in _scores_of(method, data, train, batch_size, rows):
            if normalize:
                denom = q_norm[q0:q0 + S.shape[0], None] * train_norm[None]
                S = torch.where(denom > 0, S / denom.clamp_min(1e-300), torch.zeros_like(S))
            if subtasks:
                unit_sum += S.sum(0)
            elif aggregate == "max":
                agg = torch.maximum(agg, S.amax(0))
            else:
                agg += S.sum(0)
        n_units += 1 if subtasks else m
        if subtasks:
            agg = torch.maximum(agg, unit_sum / m) if aggregate == "max" else agg + unit_sum / m
    if aggregate == "mean":
        agg /= n_units
    return _pick(agg, count, descending=True)


def harmful(method, train, valid, *, k: Optional[int] = None, fraction: Optional[float] = None,
            batch_size: int = 64, query_batch: Optional[int] = None):
    """The training examples whose total influence ``Σ_{v ∈ valid} score(v, n)`` on the
    validation loss is most negative (removing them should lower it), most harmful first.
    ``scores`` are those totals; with ``k``/``fraction`` larger than the number of harmful
    examples the tail has scores ≥ 0 (keep ``scores < 0`` to drop only harmful ones)."""
    fn = "harmful"
    _count_request(fn, k, fraction)
    n = _length(train)
    count = _count(fn, k, fraction, n)
    if _length(valid) == 0:
        raise ValueError(f"{fn}: valid is empty")
    total = torch.zeros(n, dtype=torch.float64)
    for _, S in _scores_of(method, valid, train, batch_size, _query_batch(query_batch, n)):
        total += S.sum(0)
    return _pick(total, count, descending=False)


def suspicious(method, train, *, k: Optional[int] = None, fraction: Optional[float] = None,
               batch_size: int = 64):
    """The training examples with the highest self-influence (mislabel candidates), highest
    first; ``scores`` are the self-influences."""
    fn = "suspicious"
    _count_request(fn, k, fraction)
    s = method.self_scores(train, batch_size=batch_size).double().cpu()
    return _pick(s, _count(fn, k, fraction, len(s)), descending=True)
