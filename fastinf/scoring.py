"""The scoring engine: every loop of every method, written once.

Pairwise scores, streaming top-k, self-scores, building a store, the train side over data batches
or store shards, the distributed split: all run here, for any object following the method
protocol below (:class:`fastinf.EKFAC`, :class:`fastinf.TracIn`). A method holds only its math:

``score(q, n) = Σ_terms w · Σ_parts ⟨query record of q, train record of n⟩_F``
``self(n)     = Σ_terms w · Σ_parts self_layer(part, train record of n)``

**Method protocol** (see docs/architecture.md):

* attributes ``model``, ``modules`` (``{name: module}``), ``loss_fn``, ``token_mask_fn``,
  ``progress`` (what the engine captures with), ``dtype`` (the scores' compute dtype) and
  ``backend`` (kernel backend for the ops, None = fastest usable);
* ``terms() -> [(method, weight, at)]``: the weighted model states summed over (TracIn's
  checkpoints; ``[(self, 1.0, nullcontext)]`` for EK-FAC); ``at()`` is a context manager putting
  the model in that state, ``method`` the object whose capture settings and records compute the
  term (itself; an ensemble lists its members' terms);
* ``query_layers(layers, **options) -> {part: record}``: the query side of one query batch
  ``{module: LayerBatch}`` (``options``: e.g. EK-FAC's ``query_rank``); records of
  :mod:`fastinf.layers` with Q examples (EK-FAC: ``H⁻¹D_q`` dense or rank-r factors);
* ``train_layers(layers) -> {part: record}``: the train side of one batch, what a store keeps
  (identity, or TracIn's projection);
* ``self_layer(part, record) -> [B]``: the self-influence of one part;
* ``store_spec() -> dict``: JSON settings a store is checked against (raises if not ready).

Results come back as float32 on the CPU.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from . import distributed as dist
from ._pass import factor_pass, model_device, progress_bar
from .capture import layer_shape
from .data import _check_batch_size, num_examples
from .replay import BlockReplay
from .ops._common import release_heap, release_scratch
from .layers import (Arena, Eigen, EigenTokens, LayerBatch, Projected, Query, RecordStack, cat_parts,
                     choose_layouts, decode, encode, score)
from .store import Store, StoreWriter, build_lock, hash_state

__all__ = ["GradientStore", "pairwise", "top_influences", "self_scores", "query_state",
           "query_batches"]


# --------------------------------------------------------------------------- helpers
def subset(data, start: int, stop: int):
    """Examples ``[start, stop)`` of any accepted data form, in the same form."""
    if isinstance(data, torch.Tensor):
        return data[start:stop]
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(t[start:stop] for t in data)
    if isinstance(data, DataLoader):
        bs = data.batch_size if data.batch_size is not None else data.batch_sampler.batch_size
        return DataLoader(Subset(data.dataset, range(start, stop)), batch_size=bs,
                          shuffle=False, collate_fn=data.collate_fn, num_workers=data.num_workers)
    return Subset(data, range(start, stop))


def _pass(method, data, batch_size, name, measurement_fn=None, names=None, replay=None, base=0):
    """``(offset, {module: LayerBatch})`` per batch of ``data`` with the method's capture
    (``names``: of these modules only; ``replay``: a :class:`fastinf.replay.BlockReplay` of
    ``data``, its batches keyed ``base + offset``)."""
    what = "loss_fn" if measurement_fn is None else "measurement_fn"
    modules = method.modules if names is None else \
        {n: m for n, m in method.modules.items() if n in names}
    return factor_pass(method.model, measurement_fn or method.loss_fn, data, modules,
                       batch_size, token_mask_fn=method.token_mask_fn, desc=f"fastinf {name}",
                       progress=method.progress, what=what, name=name, replay=replay, base=base)


def _sum_scores(method, records, state, per_module=False, per_token=False
                ) -> Dict[str, torch.Tensor]:
    """``{"": [B, Q]}`` the parts of one train batch scored against the queries and summed;
    ``per_module``: one entry per part; ``per_token``: ``[B, Q, T]`` per train token."""
    out: Dict[str, torch.Tensor] = {}
    T = None
    for part, rec in records.items():
        if (per_module or per_token) and isinstance(rec, Projected):
            _no_projection(per_module, per_token)
        s = score(rec, state[part], method.dtype, method.backend, per_token=per_token)
        if per_token:
            if T is not None and s.shape[2] != T[1]:
                raise ValueError(
                    f"per_token=True needs every tracked layer to see the same tokens, but "
                    f"{T[0]!r} sees {T[1]} per example and {part!r} sees {s.shape[2]} (e.g. a head "
                    "on a pooled vector, a convolution, or a module called several times); pass "
                    "modules=[...] with the layers of one token sequence")
            T = (part, s.shape[2])
        key = part if per_module else ""
        out[key] = s if key not in out else out[key] + s
    return out


def _no_projection(per_module, per_token):
    what = "per_token=True" if per_token else "per_module=True"
    raise ValueError(f"{what} is not available with a projection: the projected gradients of "
                     "all layers are one record (a RandomProjection mixes layers and tokens, a "
                     "KroneckerProjection keeps no tokens and is stored as one block); use "
                     "projection=None")


def _add_block(out: Dict[str, torch.Tensor], block: Dict[str, torch.Tensor], off: int, n: int,
               w: float = 1.0) -> None:
    """``out[key][:, off:off+B] += w · block[key]`` for blocks ``[Q, B]`` or ``[Q, B, T]``
    (``out`` allocated ``[Q, n(, T)]`` on first use, its T grown to the longest block)."""
    for k, v in block.items():
        cur = out.get(k)
        if cur is None:
            cur = v.new_zeros((v.shape[0], n) + tuple(v.shape[2:]))
        elif v.dim() == 3 and v.shape[2] > cur.shape[2]:
            cur = torch.nn.functional.pad(cur, (0, v.shape[2] - cur.shape[2]))
        tgt = cur[:, off:off + v.shape[1]]
        if v.dim() == 3:
            tgt = tgt[:, :, :v.shape[2]]
        tgt += w * v.to(cur.device)
        out[k] = cur


def _sum_self(method, records) -> torch.Tensor:
    total = None
    for part, rec in records.items():
        s = method.self_layer(part, rec)
        total = s if total is None else total + s
    return total


def model_fingerprint(method) -> dict:
    return {"modules": {n: list(layer_shape(m)) for n, m in method.modules.items()},
            "weights_sha256": hash_state(method.model.state_dict())}


def check_store(store: Store, method) -> None:
    """Raises :class:`fastinf.StoreError` if ``store`` was not built with ``method``."""
    store.check_match(model_fingerprint(method), method.store_spec())


# --------------------------------------------------------------------------- query side
def _query_records(method, query, batch_size: int, measurement_fn=None, names=None,
                   replays=None, base=0, stacks=None, n=0, arena=None, **options):
    """Yields ``(term index, {part: record})`` per capture batch of ``query``, term by term
    (the model in that term's state while the term's batches are consumed); ``names``: of
    these layers only; ``replays``: a :class:`fastinf.replay.BlockReplay` per term, ``query``
    being examples ``base..`` of the data they record; ``stacks``: per term the
    :class:`RecordStack` of each part (``n`` queries) that :func:`_assemble` fills, which a
    method with ``writes_into = True`` writes its records into (``query_layers(..., sink=)``),
    their buffers taken from ``arena`` (a :class:`fastinf.layers.Arena`) if given."""
    for i, (m, _, at) in enumerate(method.terms()):
        sink = {} if stacks is None or not getattr(m, "writes_into", False) else \
            {"sink": _sink(stacks[i], n, arena)}
        with at():
            for _, layers in _pass(m, query, batch_size, "query", measurement_fn, names,
                                   replays[i] if replays else None, base):
                yield i, m.query_layers(layers, **sink, **options)


def _sink(stacks: Dict[str, RecordStack], n: int, arena=None):
    """``sink(part, b, shape, dtype, device)``: where a method writes the next ``b`` rows of a
    part's query state (the part's :class:`RecordStack` buffer; None: a fresh tensor);
    ``sink.tokens(part, b, T, din, dout, dtype, device)``: the ``(A, G)`` rows of token
    queries' buffers (:meth:`fastinf.layers.RecordStack.reserve_tokens`)."""
    def sink(part, b, shape, dtype, device):
        return stacks.setdefault(part, RecordStack(n, arena)).reserve(b, shape, dtype, device)

    def tokens(part, b, T, din, dout, dtype, device):    # EigenTokens' (A, G) rows, or None
        return stacks.setdefault(part, RecordStack(n, arena)).reserve_tokens(
            b, T, din, dout, dtype, device)
    sink.tokens = tokens
    return sink


def _check_measurement_fn(measurement_fn):
    if measurement_fn is not None and not callable(measurement_fn):
        raise TypeError("measurement_fn must be callable as measurement_fn(model, batch)")


def _assemble(method, items, n: int, stacks=None, arena=None) -> List[Dict[str, Query]]:
    """Per term ``{part: Query}`` of ``n`` queries from ``(term, records)`` items: each part's
    capture batches are written into one buffer (:class:`fastinf.layers.RecordStack`; the
    ``stacks`` given to :func:`_query_records`, where it wrote into them), so no query state is
    ever concatenated or copied whole."""
    stacks = stacks if stacks is not None else [{} for _ in method.terms()]
    for i, recs in items:
        for p, r in recs.items():
            stacks[i].setdefault(p, RecordStack(n, arena)).add(r)
        del recs
    return [{p: Query(s.result()) for p, s in st.items()} for st in stacks]


def query_state(method, query, batch_size: int, measurement_fn=None, **options
                ) -> List[Dict[str, Query]]:
    """Per term of the method: ``{part: Query}`` over all of ``query``."""
    _check_batch_size(batch_size)
    _check_measurement_fn(measurement_fn)
    n = num_examples(query, "query")
    stacks = [{} for _ in method.terms()]
    return _assemble(method, _query_records(method, query, batch_size, measurement_fn,
                                            stacks=stacks, n=n, **options), n, stacks)


def _n_query(state) -> int:
    return len(next(iter(state[0].values())))


def query_memory_bytes() -> int:
    """The query side's memory budget (env ``FASTINF_QUERY_MEMORY_MB``, default 512): the
    bytes of query state one query batch (or group of layers) holds. Peak memory is about the
    process's own (model, factors) + this budget + one train batch's capture and scoring
    workspace (~0.4 GB for the d=256, T=48 transformer of ``bench/e2e/ekfac_cost.py`` at
    batch 32). On the d=256 transformer of ``bench/peers/transformer.py`` (256 queries × 256
    train, T=48) exact pairwise under 512 takes 4 groups of layers (queries kept as rotated
    tokens, :func:`query_batches`) and peaks at 1.21-1.22 GB of RSS against Kronfluence's
    1.30-1.35 GB (2026-12-08, 2 threads). A larger budget means fewer passes: raise it where
    memory allows."""
    return int(float(os.environ.get("FASTINF_QUERY_MEMORY_MB", "512")) * 2**20)


def _record_bytes(r) -> int:
    return sum(t.numel() * t.element_size()
               for t in (getattr(r, f, None) for f in ("A", "G", "mask", "D", "X"))
               if isinstance(t, torch.Tensor))


def _state_bytes(state) -> int:
    """Bytes held by the records of a query state (all terms and parts)."""
    return sum(_record_bytes(q.rec) for st in state for q in st.values())


def _layer_names(method, st):
    """The layers a query state holds where it holds some of the method's layers only (a group
    of :func:`query_batches`), else None (all)."""
    if any(isinstance(q.rec, Projected) for q in st.values()):   # one part of all layers
        return None
    return list(st) if set(st) < set(method.modules) else None


def _part_bytes(items, n: int, dense: bool = False) -> Dict[str, int]:
    """``{part: bytes per query}`` of ``(term, records)`` items of ``n`` queries (``dense``:
    token queries counted in their dense form; a function of its own: a loop variable of the
    generator :func:`query_batches` would keep the last records alive across all its query
    batches)."""
    sizes: Dict[str, int] = {}
    for _, recs in items:
        for p, r in recs.items():
            b = r.dense_bytes() if dense and isinstance(r, EigenTokens) else _record_bytes(r) // n
            sizes[p] = sizes.get(p, 0) + b
    return sizes


def _groups(sizes: Dict[str, int], cap: int) -> List[List[str]]:
    """Parts packed into as few groups of at most ``cap`` bytes as first-fit decreasing finds
    (a part above ``cap`` alone), each group in the order of ``sizes``."""
    groups: List[List[str]] = []
    used: List[int] = []
    for p in sorted(sizes, key=lambda p: -sizes[p]):
        g = next((i for i, u in enumerate(used) if u + sizes[p] <= cap), None)
        if g is None:
            groups.append([])
            used.append(0)
            g = len(groups) - 1
        groups[g].append(p)
        used[g] += sizes[p]
    order = {p: i for i, p in enumerate(sizes)}
    return sorted((sorted(g, key=order.get) for g in groups), key=lambda g: order[g[0]])


def _groups_by_block(sizes: Dict[str, int], cap: int, block_of: Dict[str, int]) -> List[List[str]]:
    """Parts packed for block replay (:mod:`fastinf.replay`): a later group costs a replay of
    every block it touches, so each block's layers are packed by themselves (first-fit
    decreasing, :func:`_groups`) and no group spans two blocks. The first group is captured by
    the full recording pass, which costs the same whatever it holds: it takes the layers
    outside the blocks (an LM head), then whole groups of the blocks, largest first, while they
    fit ``cap``. On the d=256 Llama of ``bench/peers`` (layers of 64 and 172 MiB under a 300 MiB
    cap) that is 11 block replays per dataset where consecutive layers took 15 (3 of its 13
    groups spanned two blocks)."""
    order = {p: i for i, p in enumerate(sizes)}
    first = [p for p in sizes if p not in block_of]
    used = sum(sizes[p] for p in first)
    packed: List[List[str]] = []
    for b in sorted({block_of[p] for p in sizes if p in block_of}):
        packed += _groups({p: sizes[p] for p in sizes if block_of.get(p) == b}, cap)
    later = []
    for g, size in sorted(((g, sum(sizes[p] for p in g)) for g in packed), key=lambda x: -x[1]):
        if used + size <= cap:
            first += g
            used += size
        else:
            later.append(g)
    later.sort(key=lambda g: order[g[0]])
    return ([sorted(first, key=order.get)] if first else []) + later


def _replays(method, what: str, keep=None):
    """A :class:`fastinf.replay.BlockReplay` per term of the method (recording the blocks
    ``keep``, None: all)."""
    return [BlockReplay(m.model, m.modules, what=what, keep=keep) for m, _, _ in method.terms()]


def _replay_groups(sizes: Dict[str, int], budget: int, Q: int, first: int, train_size: int,
                   replays) -> Optional[Tuple[List[List[str]], set]]:
    """``(groups, blocks)`` for block replay under ``budget``, or None where even the largest
    layer's queries do not fit beside the records. The records of a block count against the
    budget only where a later group replays it (the first group's passes are full; a block
    wholly inside it is never replayed, so it is not recorded): from all blocks, the blocks the
    later groups touch are recounted until they stop shrinking (a larger cap can put whole
    blocks into the first group). On the d=256 Llama's rank-32 queries (four blocks of 152 MiB
    and a 20 MiB head) that is 2 block replays per dataset instead of 3, half the records."""
    block_of = replays[0].block_of
    needed = set(block_of.values())
    best = None
    while True:
        per = [r.block_bytes(needed) for r in replays]
        rec = sum(min(r.budget, b * Q // first) + min(r.budget, b * train_size // first)
                  for r, b in zip(replays, per))
        if Q * max(sizes.values()) > budget - rec:
            return best
        groups = _groups_by_block(sizes, (budget - rec) // Q, block_of)
        touched = {block_of[p] for g in groups[1:] for p in g}
        if not touched <= needed:       # the recount would not hold: keep the last plan
            return best
        best = (groups, touched)
        if touched == needed:
            return best
        needed = touched


def _plan(sizes: Dict[str, int], budget: int, Q: int, first: int, batch_size: int,
          train_size, replays, per_layer: bool):
    """``(kind, query batch size, groups of layers, replayed blocks)`` for query parts of
    ``sizes`` bytes per query (see :func:`query_batches`); kind ``"one"`` (all queries at
    once), ``"batches"`` (query batches), ``"replay"`` (groups of layers by block replay) or
    ``"groups"`` (groups of layers by full passes)."""
    qbs = max(first, budget // max(1, sum(sizes.values())))
    if qbs >= Q:
        return "one", qbs, [None], None
    if per_layer and train_size is not None and Q <= train_size and \
            Q * max(sizes.values()) <= budget:
        # block records of the queries and of the train set, within the same budget
        plan = _replay_groups(sizes, budget, Q, first, train_size, replays) \
            if replays and all(r.active for r in replays) else None
        if plan is not None:
            return "replay", Q, plan[0], plan[1]
        return "groups", Q, _groups(sizes, budget // Q), None
    if batch_size < qbs:
        qbs = qbs // batch_size * batch_size       # whole capture batches
    return "batches", qbs, [None], None


def _plan_cost(plan, head, tokens, Q: int, train_size, replays) -> float:
    """A plan's FLOPs beyond those every plan spends (:func:`query_batches` picks the cheaper of
    dense and token queries, :class:`fastinf.layers.EigenTokens`): the passes it repeats, about
    ``4·n·T·din·dout`` per layer and example (forward and input gradients: a later group's block
    replay over the queries and the train set, a full pass per later group or query batch), and
    for token queries (``tokens``) the rebuild of ``X_q`` per train tile, ``2·Q·T·din·dout`` per
    layer. Without a train size (a store, per-token scores) the count of query passes."""
    kind, qbs, groups, _ = plan
    if train_size is None:
        return float(-(-Q // qbs))
    recs = head[0][1]
    T = max(recs[p].A.shape[1] for p in tokens)
    el = recs[next(iter(tokens))].A.element_size()
    shape = {p: (r.dout, r.din) if isinstance(r, EigenTokens) else tuple(r.X.shape[1:])
             for p, r in recs.items()}
    P = {p: d * i for p, (d, i) in shape.items()}
    most, cap = train_tile()
    cost = 0.0
    for g in groups:
        names = list(recs) if g is None else g
        per_example = T * el * sum(sum(shape[p]) for p in names)
        tile = max(1, min(most, cap // max(1, per_example)))
        rebuild = 2.0 * min(Q, qbs) * T * sum(P[p] for p in names if p in tokens)
        cost += -(-Q // qbs) * -(-train_size // tile) * rebuild
    if kind == "batches":
        cost += (-(-Q // qbs) - 1) * 4.0 * train_size * T * sum(P.values())
    elif kind in ("groups", "replay"):
        block_of = replays[0].block_of if kind == "replay" else {}
        for g in groups[1:]:
            blocks = {block_of.get(p) for p in g}
            cost += 4.0 * (Q + train_size) * T * sum(
                P[p] for p in P if kind == "groups" or block_of.get(p) in blocks)
    return cost


def _slice(data, start, stop, n):
    return data if (start, stop) == (0, n) else subset(data, start, stop)


def _check_query_batch_size(query_batch_size):
    if query_batch_size is not None and (isinstance(query_batch_size, bool) or
                                         not isinstance(query_batch_size, int)
                                         or query_batch_size < 1):
        raise ValueError(f"query_batch_size must be None (from the memory budget) or a positive "
                         f"int, got {query_batch_size!r}")


def query_batches(method, query, batch_size: int, query_batch_size=None, measurement_fn=None,
                  train_size=None, train_replays=None, **options):
    """Yields ``(q0, state)``: the query state of queries ``[q0, q0 + len)``, one query batch
    at a time. ``query_batch_size=None``: the first ``batch_size`` queries are computed, their
    state's bytes per query measured, and the batch made as large as
    :func:`query_memory_bytes` allows (so with few or low-rank queries one batch holds all).

    ``train_size`` (for a consumer that sums the parts itself, as :func:`pairwise` from data):
    where all queries do not fit the budget but all queries of each layer do, and there are no
    more queries than ``train_size`` train examples, the layers are split instead of the
    queries: every query, once per group of layers (each state holds its group's parts, and
    the consumer's train pass captures those layers only). The train side is then computed
    once per group of layers (its tokens rotated, its gradients materialised once in all)
    instead of in full once per query batch, at the cost of a query pass per group. Where the
    model has a stack of blocks (:mod:`fastinf.replay`), the passes after the first replay only
    the blocks holding the group's layers; the groups are then packed block by block
    (:func:`_groups_by_block`, one block replayed per later group), and the
    block records of the queries and of the train set (estimated from the first batch) count
    against the same budget. ``train_replays`` (a dict) then receives the train side's
    :class:`fastinf.replay.BlockReplay` per term, for :func:`_data_block`.

    EK-FAC's exact queries (``compact_queries``, default True) are measured in both forms: dense
    (``X_q [dout, din]`` per query) and, for layers with ``T·(din + dout) < din·dout``, as
    rotated tokens (:class:`fastinf.layers.EigenTokens`, ``X_q`` rebuilt per train tile). Where
    the dense state does not fit the budget at once, the plan of each form is made and the one
    of fewer FLOPs kept (:func:`_plan_cost`: repeated passes against rebuilds); on the d=256
    ``bench/peers`` transformers the token form needs 4 groups of layers where the dense one
    needs 12-13, and pairwise takes ~10% less time."""
    _check_batch_size(batch_size)
    _check_query_batch_size(query_batch_size)
    Q = num_examples(query, "query")
    if Q == 0:
        raise ValueError("'query' is empty: nothing to compute")
    _check_measurement_fn(measurement_fn)
    qbs, head, groups, replays = query_batch_size, [], [None], None
    if qbs is None:
        # the first capture batch's records, measured, then written into the first query batch
        first = min(Q, batch_size)
        if train_size is not None:     # groups of layers possible: record the blocks
            replays = _replays(method, "query")
        compact = all(getattr(m, "compact_queries", False) for m, _, _ in method.terms())
        head = list(_query_records(method, _slice(query, 0, first, Q), batch_size,
                                   measurement_fn, replays=replays,
                                   **(dict(options, compact=True) if compact else options)))
        sizes = _part_bytes(head, first)
        tokens = {p for _, recs in head for p, r in recs.items() if isinstance(r, EigenTokens)}
        dense = _part_bytes(head, first, dense=True)
        budget = query_memory_bytes()
        per_layer = set(sizes) <= set(method.modules) and not any(
            isinstance(r, Projected) for _, recs in head for r in recs.values())
        plan = _plan(dense, budget, Q, first, batch_size, train_size, replays, per_layer)
        if tokens and plan[0] != "one":
            alt = _plan(sizes, budget, Q, first, batch_size, train_size, replays, per_layer)
            if _plan_cost(alt, head, tokens, Q, train_size, replays) < \
                    _plan_cost(plan, head, tokens, Q, train_size, replays):
                plan = alt
                options = dict(options, compact=frozenset(tokens))
        if compact and "compact" not in options:   # dense queries: the head's records too
            head = [(i, {p: r.to_eigen() if isinstance(r, EigenTokens) else r
                         for p, r in recs.items()}) for i, recs in head]
        kind, qbs, groups, blocks = plan
        if kind == "replay":
            for r in replays:
                r.restrict(blocks)
            if train_replays is not None:
                train_replays.update(enumerate(_replays(method, "train", blocks)))
        else:
            replays = None
    arena = Arena()      # the buffers of one query batch (or group), reused by the next
    for group in groups:
        if group is not None:     # the head's records of the other groups are dropped
            head = [(i, {p: r for p, r in recs.items() if p in group}) for i, recs in head]
        q0 = 0
        while q0 < Q:
            stop = min(Q, q0 + qbs)
            q1 = q0 + sum(len(next(iter(recs.values()))) for i, recs in head if i == 0)
            arena.reset()
            release_heap()     # the last train pass's tiles, before this query pass: glibc
            #                    keeps them resident (~0.1 GB more peak on Llama)
            stacks: List[Dict[str, RecordStack]] = [{} for _ in method.terms()]
            items = itertools.chain(_drain(head), _query_records(
                method, _slice(query, q1, stop, Q), batch_size, measurement_fn, group,
                replays, q1, stacks, stop - q0, arena, **options) if q1 < stop else ())
            state = _assemble(method, items, stop - q0, stacks, arena)
            release_heap()     # the query pass's transients, before the train pass
            yield q0, state
            del state, items, stacks
            q0 = stop


def _drain(items: list):
    """Yields and forgets the items of a list (each freed once consumed)."""
    while items:
        yield items.pop(0)


# --------------------------------------------------------------------------- train side
def _data_block(method, state, data, batch_size, replays=None, base=0, **how
                ) -> Dict[str, torch.Tensor]:
    """``{key: [Q, n(, T)]}`` scores against ``data`` by a gradient pass per term. ``replays``:
    per term the :class:`fastinf.replay.BlockReplay` of ``data`` (its examples ``base..``),
    used where the state holds a group of layers."""
    out: Dict[str, torch.Tensor] = {}
    n = num_examples(data)
    for i, ((m, w, at), st) in enumerate(zip(method.terms(), state)):
        names = _layer_names(m, st)
        rp = None if names is None or not replays else replays.get(i)
        tiles = any(isinstance(q.rec, (LayerBatch, Eigen, EigenTokens)) for q in st.values())
        with at():
            batches = _pass(m, data, batch_size, "train", names=names, replay=rp, base=base)
            for off, recs in _train_tiles(m, batches) if tiles else \
                    ((o, m.train_layers(lay)) for o, lay in batches):
                s = _sum_scores(m, recs, st, **how)
                _add_block(out, {k: v.transpose(0, 1) for k, v in s.items()}, off, n, w)
                del recs, s     # not alive while the next tile is captured
    return out


def train_tile() -> Tuple[int, int]:
    """``(examples, bytes)``: against factor queries (rank-r, TracIn's tokens), consecutive
    train batches are scored together up to this many examples or bytes of train records (env
    ``FASTINF_TRAIN_TILE``, default 128 examples; 128 MiB): the queries' dense form, where
    scoring through it is cheaper, is rebuilt once per tile (``2·Q·r·dout·din`` FLOPs), as many
    FLOPs as the scores of ``r`` train examples. Against EK-FAC's exact queries (kept in the
    eigenbasis) a tile reads the queries' ``[Q, dout, din]`` once for its examples: 161 ms per
    256 train examples in tiles of 128 against 240 ms in batches of 32 (256 queries, a 688 x 256
    layer, 2 threads; ``ops.score_dense.D_TILE``). Other dense queries are scored per batch."""
    return int(os.environ.get("FASTINF_TRAIN_TILE", "128")), 128 * 2**20


def _train_tiles(method, batches):
    """``(offset, {part: record})``: the method's train records of consecutive capture batches
    concatenated into tiles of :func:`train_tile`. A tile is handed on as soon as another batch
    like its last would not fit, before that batch is captured, and neither the batch records
    nor the last tile are held while the next is built (a tile and a batch beside it were
    ~0.1 GB of the d=256 transformer's exact pairwise peak)."""
    most, cap = train_tile()
    buf: List[Dict[str, object]] = []
    start, count, size = 0, 0, 0

    def joined():
        if len(buf) == 1:
            return buf[0]
        out = {}
        for p in list(buf[0]):      # part by part, each batch's record dropped once joined:
            st = RecordStack(count)     # only one part is held twice at a time, not the tile
            for recs in buf:
                st.add(recs.pop(p))
            out[p] = st.result()
        return out

    def flush():        # the tile of the batches so far, handed on and not held here
        nonlocal buf, count, size
        tile = joined()
        buf, count, size = [], 0, 0
        yield start, tile

    for off, layers in batches:
        recs = method.train_layers(layers)
        del layers
        b = len(next(iter(recs.values())))
        nbytes = sum(_record_bytes(r) for r in recs.values())
        if buf and (count + b > most or size + nbytes > cap):   # a batch unlike the last
            yield from flush()
        if not buf:
            start = off
        buf.append(recs)
        del recs
        count += b
        size += nbytes
        if count + b > most or size + nbytes > cap:     # another batch like it would not fit:
            yield from flush()  # the tile now, before that batch is captured (it would be
            #                     alive beside the tile while it is scored)
    if buf:
        yield from flush()


def _shard_block(method, state, store: Store, i: int, **how) -> Dict[str, torch.Tensor]:
    """``{key: [Q, n_shard(, T)]}`` scores against shard ``i`` of a store."""
    tensors = store.read_shard(i)
    out: Dict[str, torch.Tensor] = {}
    n = store.shards[i]["stop"] - store.shards[i]["start"]
    for c, ((m, w, _), st) in enumerate(zip(method.terms(), state)):
        recs = decode(tensors, f"c{c}", m.modules, store.layouts, model_device(m.model),
                      tokens=how.get("per_token", False))
        s = _sum_scores(m, recs, st, **how)
        _add_block(out, {k: v.transpose(0, 1) for k, v in s.items()}, 0, n, w)
    return out


def _check_store_for(store: Store, per_module: bool, per_token: bool) -> None:
    """A clear error before any work where the store lacks what the requested scores need."""
    if not (per_module or per_token):
        return
    if "proj" in store.layouts or not store.layouts:
        _no_projection(per_module, per_token)
    dense = [k for k, v in store.layouts.items() if v != "factors"]
    if per_token and dense:
        raise ValueError(f"per_token=True needs the train tokens, but the store keeps layer(s) "
                         f"{dense} as dense per-example gradients (layout 'dense'); rebuild it "
                         "with GradientStore.build(..., layout='factors') or score from data")


def _train_blocks(method, state, train, batch_size, chunk, replays=None, **how):
    """Yields ``(offset, {key: scores [Q, B(, T)]})`` blocks of this rank's part of the train
    side (``how``: ``per_module`` / ``per_token`` of :func:`_sum_scores`; ``replays``: see
    :func:`_data_block`)."""
    if isinstance(train, Store):
        check_store(train, method)
        for i, s in enumerate(train.shards):
            if dist.mine(i):
                yield s["start"], _shard_block(method, state, train, i, **how)
        return
    n = num_examples(train)
    # contiguous split across ranks, aligned to batches, then chunks bound the memory
    per = -(-n // dist.world())
    per = -(-per // batch_size) * batch_size
    lo, hi = min(n, dist.rank() * per), min(n, (dist.rank() + 1) * per)
    chunk = max(batch_size, chunk // batch_size * batch_size)
    for start in range(lo, hi, chunk):
        stop = min(hi, start + chunk)
        yield start, _data_block(method, state, _slice(train, start, stop, n), batch_size,
                                 replays, start, **how)


# --------------------------------------------------------------------------- outputs
def _releasing_scratch(fn):
    """Frees the ops' scratch buffers (:func:`fastinf.ops._common.scratch`) when ``fn`` ends."""
    @functools.wraps(fn)
    def run(*a, **k):
        try:
            return fn(*a, **k)
        finally:
            release_scratch()
    return run


@_releasing_scratch
def pairwise(method, query, train, batch_size: int = 64, *, measurement_fn=None,
             query_batch_size=None, per_module: bool = False, per_token: bool = False,
             **options):
    """``[n_query, n_train]`` float32 scores (CPU); every rank returns the full matrix.

    Queries are scored ``query_batch_size`` at a time (see :func:`query_batches`); the train
    side is recomputed per query batch unless it is a store (from data, with the default
    ``query_batch_size`` and not ``per_token``, the layers may be split into groups instead,
    every query scored once per group: see :func:`query_batches`). ``per_token``: ``[Q, N, T]``
    (T: the most tokens of a train example; masked and missing tokens 0); ``per_module``:
    ``{module name: scores}`` (with ``per_token`` each ``[Q, N, T]``).
    """
    for name, v in (("per_module", per_module), ("per_token", per_token)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be True or False, got {v!r}")

    if isinstance(train, Store):
        _check_store_for(train, per_module, per_token)
    n = num_examples(train)
    parts: List[str] = []
    out: Dict[str, torch.Tensor] = {}
    Q = num_examples(query, "query")
    replays: dict = {}      # the train side's block replays, shared by the groups of layers
    for q0, state in query_batches(method, query, batch_size, query_batch_size, measurement_fn,
                                   None if isinstance(train, Store) or per_token else n,
                                   replays, **options):
        if per_module or per_token:
            if any(isinstance(q.rec, Projected) for st in state for q in st.values()):
                _no_projection(per_module, per_token)
        blocks = [(o, {k: v.float().cpu() for k, v in b.items()})
                  for o, b in _train_blocks(method, state, train, batch_size, max(n, 1),
                                            replays, per_module=per_module,
                                            per_token=per_token)]
        rows: Dict[str, torch.Tensor] = {}
        for part in dist.all_gather_object(blocks):
            for o, b in part:
                _add_block(rows, b, o, n)
        for k, v in rows.items():
            _add_block(out, {k: v.transpose(0, 1)}, q0, Q)    # rows q0.. of [Q, n(, T)]
        parts += [p for p in state[0] if p not in parts]
        del state, blocks, rows      # the next query batch is computed without this one
    out = {k: v.transpose(0, 1).contiguous() for k, v in out.items()}
    order = {p: i for i, p in enumerate(method.modules)}   # groups of layers: in module order
    parts.sort(key=lambda p: order.get(p, -1))
    return {p: out[p] for p in parts} if per_module else out[""]


def _normalize_indices(train_indices, Q, n):
    if train_indices is None:
        return None
    if isinstance(train_indices, torch.Tensor):
        idx = train_indices.to(torch.int64).reshape(-1)
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"train_indices: values must lie in [0, {n}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        m = torch.zeros(n, dtype=torch.bool)
        m[idx] = True
        return m[None]
    if isinstance(train_indices, Sequence):
        if len(train_indices) != Q:
            raise ValueError(f"train_indices: one index tensor per query expected ({Q}), got "
                             f"{len(train_indices)}")
        m = torch.zeros(Q, n, dtype=torch.bool)
        for q, t in enumerate(train_indices):
            t = torch.as_tensor(t, dtype=torch.int64).reshape(-1)
            if t.numel() and (t.min() < 0 or t.max() >= n):
                raise ValueError(f"train_indices[{q}]: values must lie in [0, {n})")
            m[q, t] = True
        return m
    raise TypeError("train_indices must be None, a tensor of indices, or a list of index tensors "
                    "(one per query)")


@_releasing_scratch
def top_influences(method, query, train, k: int = 10, largest: bool = True, train_indices=None,
                   batch_size: int = 64, *, chunk: int = 4096, measurement_fn=None,
                   query_batch_size=None, **options):
    """``(values [Q, k], indices [Q, k])`` streamed over shards / chunks of ``train``, per query
    batch (see :func:`query_batches`).

    Memory: one query batch's state, one shard (or chunk) of scores ``[query batch, chunk]`` and
    the running top-k. Where a query has fewer than k candidates the tail is ``nan`` / ``-1``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    Q = num_examples(query, "query")
    n = num_examples(train)
    allowed = _normalize_indices(train_indices, Q, n)     # bool [1|Q, n] (n bits, not n×Q scores)
    fill = float("-inf") if largest else float("inf")
    vals_all, idxs_all = [], []
    for q0, state in query_batches(method, query, batch_size, query_batch_size, measurement_fn,
                                   **options):
        nq = _n_query(state)
        ok = None if allowed is None else allowed if allowed.shape[0] == 1 else allowed[q0:q0 + nq]
        vals = torch.full((nq, 0), fill)
        idxs = torch.zeros((nq, 0), dtype=torch.int64)
        for off, block in _train_blocks(method, state, train, batch_size, chunk):
            block = block[""].float().cpu()
            B = block.shape[1]
            if ok is not None:
                block = block.masked_fill(~ok[:, off:off + B], fill)
            cand_v = torch.cat([vals, block], 1)
            cand_i = torch.cat([idxs, torch.arange(off, off + B).expand(nq, B)], 1)
            vals, pos = torch.topk(cand_v, min(k, cand_v.shape[1]), dim=1, largest=largest)
            idxs = torch.gather(cand_i, 1, pos)
        parts = dist.all_gather_object((vals, idxs))
        if len(parts) > 1:
            vals = torch.cat([p[0] for p in parts], 1)
            idxs = torch.cat([p[1] for p in parts], 1)
            vals, pos = torch.topk(vals, min(k, vals.shape[1]), dim=1, largest=largest)
            idxs = torch.gather(idxs, 1, pos)
        if vals.shape[1] < k:
            pad = k - vals.shape[1]
            vals = torch.cat([vals, torch.full((nq, pad), fill)], 1)
            idxs = torch.cat([idxs, torch.full((nq, pad), -1, dtype=torch.int64)], 1)
        vals_all.append(vals)
        idxs_all.append(idxs)
        del state
    vals, idxs = torch.cat(vals_all), torch.cat(idxs_all)
    invalid = torch.isinf(vals) & (vals == fill)
    return vals.masked_fill(invalid, float("nan")), idxs.masked_fill(invalid, -1)


@_releasing_scratch
def self_scores(method, train, batch_size: int = 64) -> torch.Tensor:
    """``[n_train]`` float32 self-influence (CPU); from a store: precomputed at build time."""
    _check_batch_size(batch_size)
    if isinstance(train, Store):
        check_store(train, method)
        return train.self_scores()
    out = None
    for m, w, at in method.terms():
        with at():
            for off, layers in _pass(m, train, batch_size, "train"):
                s = w * _sum_self(m, m.train_layers(layers))
                out = s.new_zeros(num_examples(train)) if out is None else out
                out[off:off + s.shape[0]] += s.to(out.device)
    return out.float().cpu()


# --------------------------------------------------------------------------- building a store
def _shard_tensors(method, data, batch_size, layouts, dtype) -> Dict[str, torch.Tensor]:
    """The tensors of one shard: the encoded train records per term ``c<k>/...`` and ``self``."""
    parts, self_total = [], None
    for c, (m, w, at) in enumerate(method.terms()):
        selfs = []
        with at():
            for _, layers in _pass(m, data, batch_size, "store"):
                recs = m.train_layers(layers)
                parts.append(encode(f"c{c}", recs, layouts, dtype))
                selfs.append(_sum_self(m, recs).float().cpu())
        s = w * torch.cat(selfs)
        self_total = s if self_total is None else self_total + s
    out = cat_parts(parts)
    out["self"] = self_total
    return out


class GradientStore(Store):
    """A gradient store (see :mod:`fastinf.store` for the format): ``open`` a built one, or
    ``build`` it with a method; accepted wherever a method takes ``train``."""

    def check(self, method) -> None:
        """Raises :class:`fastinf.StoreError` naming the mismatch if ``method`` (and its model)
        is not the one the store was built with."""
        check_store(self, method)

    @classmethod
    def build(cls, path, method, train, batch_size: int = 64, shard_size: int = 4096, *,
              resume: bool = True, overwrite: bool = False, progress: bool = True,
              layout: str = "auto") -> "GradientStore":
        """Runs the training-gradient pass of ``method`` over ``train`` once and writes the store.

        ``resume=True`` continues a build of the same store (same model, method, data size, shard
        and batch sizes) that stopped, also one killed while holding the build lock;
        ``overwrite=True`` replaces an existing store (whatever ``resume``); ``resume=False`` on
        an existing store raises unless ``overwrite=True``. The directory must be writable
        (checked before any pass); a build holds ``build.lock`` (pid, host, start time), so a
        second build of the same store raises :class:`StoreError` naming the first. Under
        ``torch.distributed`` each rank writes the shards ``i % world == rank``, rank 0 holds
        the lock and writes the final manifest. ``layout``: ``"auto"``
        (factors where ``T·(din+dout) < din·dout``, else dense), ``"factors"`` or ``"dense"``
        (every layer; dense makes each score one GEMM at a higher storage cost).
        """
        if layout not in ("auto", "factors", "dense"):
            raise ValueError(f"layout must be 'auto', 'factors' or 'dense', got {layout!r}")
        _check_batch_size(batch_size)
        _check_batch_size(shard_size, "shard_size")
        n = num_examples(train)
        if n == 0:
            raise ValueError("'train' is empty: nothing to store")
        spec = method.store_spec()
        with build_lock(path, recover=resume or overwrite):
            with contextlib.closing(_pass(method, subset(train, 0, min(batch_size, n)),
                                          batch_size, "store layout")) as first:
                layouts = choose_layouts(method.train_layers(next(first)[1]))
            if layout != "auto":
                layouts = {k: layout for k in layouts}
            # factors and dense gradients are kept in the model's dtype, projections in float32
            dtype = next((p.dtype for p in method.model.parameters()), torch.float32) \
                if layouts else torch.float32
            writer = StoreWriter(path, model=model_fingerprint(method), method=spec,
                                 layouts=layouts, dtype=dtype, n_examples=n, shard_size=shard_size,
                                 batch_size=batch_size, resume=resume, overwrite=overwrite)
            n_shards = (n + shard_size - 1) // shard_size
            mine = [i for i in range(n_shards) if dist.mine(i)]
            with progress_bar(sum(min(shard_size, n - i * shard_size) for i in mine),
                              "fastinf store", progress) as bar:
                for i in mine:
                    start, stop = i * shard_size, min(n, (i + 1) * shard_size)
                    if i not in writer.done:
                        writer.write(i, start, stop, _shard_tensors(
                            method, subset(train, start, stop), batch_size, layouts, dtype))
                    bar.update(stop - start)
            writer.finish(n_shards)
        return cls.open(path, verify=False)
