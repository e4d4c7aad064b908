"""Queries scored in batches: the same scores as one batch (exact), rank-r batches equal to the
dense rank-r reference, and query memory that does not grow with the number of queries."""
import weakref

import pytest
import torch

import fastinf
import fastinf.scoring as scoring
from fastinf import layers
from _models import TinyTransformer, tf_loss, token_data
from _models import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

torch.set_default_dtype(torch.float32)



def _case(seed=0, n=20, nq=11):
    torch.manual_seed(seed)
    model = TinyTransformer()
    g = torch.Generator().manual_seed(seed)
    train, query = token_data(g, n), token_data(g, nq)
    return model, train, query


def _mask(batch):
    return batch[1]


def _methods(model, train):
    ek = fastinf.EKFAC(model, tf_loss, token_mask_fn=_mask, progress=False).fit(train, batch_size=8)
    other = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    tr = fastinf.TracIn(model, tf_loss, token_mask_fn=_mask, progress=False,
                        checkpoints=[(model.state_dict(), 0.5), (other, 2.0)])
    return {"ekfac": ek, "tracin": tr}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, train, query = _case()
    ms = _methods(model, train)
    stores = {k: fastinf.GradientStore.build(tmp_path_factory.mktemp(k) / "s", m, train,
                                             batch_size=6, shard_size=7, progress=False)
              for k, m in ms.items()}
    return ms, stores, train, query


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * float(b.abs().max()), float((a - b).abs().max())


@pytest.mark.parametrize("kind", ["ekfac", "tracin"])
@pytest.mark.parametrize("source", ["data", "store"])
def test_query_batches_equal_one_batch(setup, kind, source):
    ms, stores, train, query = setup
    m = ms[kind]
    src = train if source == "data" else stores[kind]
    one = m.pairwise_scores(query, src, batch_size=4, query_batch_size=11)
    for qbs in (1, 3, 4):
        _close(m.pairwise_scores(query, src, batch_size=4, query_batch_size=qbs), one)
    v1, i1 = m.top_influences(query, src, k=3, batch_size=4, query_batch_size=11)
    vb, ib = m.top_influences(query, src, k=3, batch_size=4, query_batch_size=3)
    _close(vb, v1)
    assert torch.equal(ib, i1)
    # per-query candidate lists follow their queries into the batches
    idx = [torch.tensor([q % 20, (q + 5) % 20]) for q in range(11)]
    v1, i1 = m.top_influences(query, src, k=2, train_indices=idx, batch_size=4, query_batch_size=11)
    vb, ib = m.top_influences(query, src, k=2, train_indices=idx, batch_size=4, query_batch_size=2)
    _close(vb, v1)
    assert torch.equal(ib, i1)


def test_query_batch_size_argument_and_budget(setup, monkeypatch):
    ms, _, train, query = setup
    ek = ms["ekfac"]
    with pytest.raises(ValueError, match="query_batch_size"):
        ek.pairwise_scores(query, train, query_batch_size=0)
    with pytest.raises(ValueError, match="query_batch_size"):
        ek.top_influences(query, train, query_batch_size=2.5)
    ref = ek.pairwise_scores(query, train, batch_size=4, query_batch_size=11)
    # a budget smaller than one query's state: one capture batch per query batch
    monkeypatch.setenv("FASTINF_QUERY_MEMORY_MB", "0.0001")
    seen = []
    real = scoring.query_batches

    def spy(*a, **k):
        for q0, st in real(*a, **k):
            seen.append(scoring._n_query(st))
            yield q0, st
    monkeypatch.setattr(scoring, "query_batches", spy)
    _close(ek.pairwise_scores(query, train, batch_size=4), ref)
    assert seen == [4, 4, 3]      # never below one capture batch (batch_size)
    seen.clear()
    monkeypatch.setenv("FASTINF_QUERY_MEMORY_MB", "1024")
    _close(ek.pairwise_scores(query, train, batch_size=4), ref)
    assert seen == [11]


def _dense_rank_r_reference(ek, query, train, r):
    """``Σ_layers ⟨(H⁻¹D_q)_r, D_n⟩`` with the rank-r truncated SVD of each query's H⁻¹D_q,
    the gradients materialised one example at a time (float64)."""
    def grads(data):
        n = data[0].shape[0]
        out = {name: [] for name in ek.modules}
        for i in range(n):
            lbs = fastinf.capture.capture(ek.model, tf_loss, tuple(t[i:i + 1] for t in data),
                                          ek.modules, token_mask=data[1][i:i + 1])
            for name, lb in lbs.items():
                out[name].append(lb.to(torch.float64).dense()[0])
        return {k: torch.stack(v) for k, v in out.items()}
    Dq, Dn = grads(query), grads(train)
    S = 0
    for name in ek.modules:
        L = {k: v.double() if torch.is_tensor(v) else v for k, v in ek.factors[name].items()}
        R = L["QS"].T @ Dq[name] @ L["QA"] / (L["lam"] + L["damping"])
        M = L["QS"] @ R @ L["QA"].T
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        k = min(r, s.shape[1])
        Mr = U[:, :, :k] @ torch.diag_embed(s[:, :k]) @ Vh[:, :k]
        S = S + torch.einsum("qoi,noi->qn", Mr, Dn[name])
    return S


@pytest.mark.parametrize("source", ["data", "store"])
def test_rank_r_batches_equal_dense_rank_r_reference(setup, source):
    ms, stores, train, query = setup
    ek = ms["ekfac"]
    src = train if source == "data" else stores["ekfac"]
    ref = _dense_rank_r_reference(ek, query, train, 2)
    for qbs in (None, 3):
        got = ek.pairwise_scores(query, src, batch_size=4, query_rank=2, query_batch_size=qbs)
        _close(got.double(), ref, 1e-4)


class _Tracked(scoring.Query):
    """A Query that tallies the bytes of every query record alive when one is created."""
    live = weakref.WeakSet()
    peak = 0

    def __init__(self, rec):
        super().__init__(rec)
        _Tracked.live.add(self)
        _Tracked.peak = max(_Tracked.peak, scoring._state_bytes([{i: q for i, q in
                                                                  enumerate(_Tracked.live)}]))


def _peak_query_bytes(monkeypatch, fn):
    monkeypatch.setattr(scoring, "Query", _Tracked)
    _Tracked.live = weakref.WeakSet()
    _Tracked.peak = 0
    fn()
    return _Tracked.peak


@pytest.mark.parametrize("query_rank", [None, 2])
def test_query_memory_does_not_grow_with_the_query_count(monkeypatch, query_rank):
    """Counts the bytes of the query records alive (not timed, not RSS): for 4x the queries with
    the same budget the peak is the same, so no earlier query batch is kept."""
    model, train, _ = _case(n=12)
    g = torch.Generator().manual_seed(5)
    q16, q64 = token_data(g, 16), token_data(g, 64)
    ek = fastinf.EKFAC(model, tf_loss, token_mask_fn=_mask, progress=False).fit(train, batch_size=8)
    tr = fastinf.TracIn(model, tf_loss, token_mask_fn=_mask, progress=False)
    opts = {} if query_rank is None else {"query_rank": query_rank}
    for how in ("argument", "budget"):
        if how == "budget":   # ~2 capture batches of 8 queries (EK-FAC dense: ~1.6 KB/query)
            per = scoring._state_bytes(scoring.query_state(ek, q16, 8, **opts)) / 16
            monkeypatch.setenv("FASTINF_QUERY_MEMORY_MB", str(16 * per / 2**20))
            kw = {}
        else:
            kw = {"query_batch_size": 16}
        calls = {
            "pairwise": lambda q: ek.pairwise_scores(q, train, batch_size=8, **opts, **kw),
            "top": lambda q: ek.top_influences(q, train, k=2, batch_size=8, **opts, **kw),
            "tracin": lambda q: tr.pairwise_scores(q, train, batch_size=8, **kw),
        }
        for name, call in calls.items():
            if name == "tracin" and query_rank is not None:
                continue
            small = _peak_query_bytes(monkeypatch, lambda: call(q16))
            large = _peak_query_bytes(monkeypatch, lambda: call(q64))
            assert small > 0
            # token counts differ between query batches (padding to the batch's longest), so
            # allow a little slack; keeping the earlier batches would make it ~4x
            assert large <= 1.5 * small, (how, name, small, large)


def test_factor_queries_scored_densely_never_keep_the_dense_form(monkeypatch):
    """Rank-r / token-factor queries whose dense form is cheaper to score against are rebuilt per
    train batch in workspace-sized query chunks and dropped: the query side stays Q·r·(din+dout)
    (it held Q·dout·din per layer before: 4.9 GB at rank 32 on the d=256 transformer bench)."""
    g = torch.Generator().manual_seed(0)
    Q, r, din, dout, N, T = 10, 2, 17, 13, 6, 9
    V = torch.randn(Q, r, din, generator=g, dtype=torch.float64)
    U = torch.randn(Q, r, dout, generator=g, dtype=torch.float64)
    A = torch.randn(N, T, din, generator=g, dtype=torch.float64)
    G = torch.randn(N, T, dout, generator=g, dtype=torch.float64)
    ref = torch.einsum("qso,qsi,nto,nti->nq", U, V, G, A)
    monkeypatch.setenv("FASTINF_WORKSPACE_MB", str(3 * dout * din * 8 / 2**20))  # 3 queries/chunk
    q = layers.Query(layers.LayerBatch(V, U, None))
    q.use_dense = True
    got = layers.score(layers.LayerBatch(A, G, None), q, torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert q._dense is None and isinstance(q.rec, layers.LayerBatch)
    chunks = [D.shape[0] for _, D in q.dense_chunks()]
    assert chunks == [3, 3, 3, 1]
    dense_train = layers.DenseLayer(torch.einsum("nto,nti->noi", G, A))
    torch.testing.assert_close(layers.score(dense_train, q, torch.float64), ref, rtol=1e-12,
                               atol=1e-12)
    assert q._dense is None


def test_record_stack_writes_batches_into_one_buffer():
    """Dense records (Eigen, DenseLayer, Projected) of several batches are written into one
    buffer, equal to their concatenation; token factors are padded to the most tokens."""
    g = torch.Generator().manual_seed(1)
    QA, QS = torch.randn(3, 3, generator=g), torch.randn(2, 2, generator=g)
    X = torch.randn(7, 2, 3, generator=g)
    for make, field in ((lambda x: layers.Eigen(x, QA, QS), "X"), (layers.DenseLayer, "D"),
                        (lambda x: layers.Projected(x.flatten(1)), "X")):
        parts = [make(X[:3]), make(X[3:4]), make(X[4:])]
        st = layers.RecordStack(7)
        for p in parts:
            st.add(p)
        rec = st.result()
        assert type(rec) is type(parts[0])
        assert torch.equal(getattr(rec, field), torch.cat([getattr(p, field) for p in parts]))
        if isinstance(rec, layers.Eigen):
            assert rec.QA is QA and rec.QS is QS
        one = layers.RecordStack(7)
        one.add(make(X))
        with pytest.raises(ValueError, match="8 examples added, 7 expected"):
            one.add(make(X[:1]))
    short = layers.RecordStack(7)
    short.add(layers.DenseLayer(X[:3]))
    with pytest.raises(ValueError, match="3 examples added, 7 expected"):
        short.result()
    A1, G1 = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 5, generator=g)
    A2, G2 = torch.randn(1, 6, 3, generator=g), torch.randn(1, 6, 5, generator=g)
    st = layers.RecordStack(3)
    st.add(layers.LayerBatch(A1, G1, None))
    st.add(layers.LayerBatch(A2, G2, None))
    rec = st.result()
    assert rec.A.shape == (3, 6, 3) and rec.mask.tolist() == [[True] * 4 + [False] * 2] * 2 + \
        [[True] * 6]
    torch.testing.assert_close(rec.dense(), torch.cat([layers.LayerBatch(A1, G1).dense(),
                                                        layers.LayerBatch(A2, G2).dense()]))
    # the batches' factors are dropped once concatenated (not held beside the whole until the
    # stack goes: that doubled a rank-r query state while it was scored), and result() is stable
    import gc
    import weakref
    st = layers.RecordStack(3)
    b1, b2 = layers.LayerBatch(A1.clone(), G1.clone()), layers.LayerBatch(A2.clone(), G2.clone())
    alive = weakref.ref(b1.A)
    st.add(b1)
    st.add(b2)
    del b1, b2
    rec = st.result()
    gc.collect()
    assert alive() is None and st.result() is rec


def test_query_state_is_never_concatenated(setup, monkeypatch):
    """A query batch of several capture batches (the budget's first batch completed by the
    rest, or an explicit query_batch_size) is written into per-layer buffers: no torch.cat of
    dense [q, dout, din] query states (each would copy the whole state and double its memory,
    as before) and the scores equal one capture batch per query batch."""
    ms, _, train, query = setup
    ek = ms["ekfac"]
    shapes = {(m.out_features, m.in_features + (m.bias is not None)) for m in ek.modules.values()}
    ref = ek.pairwise_scores(query, train, batch_size=11, query_batch_size=11)
    real_cat, dense_cats = torch.cat, []

    def spy(tensors, *a, **k):
        out = real_cat(tensors, *a, **k)
        if out.dim() == 3 and tuple(out.shape[1:]) in shapes:
            dense_cats.append(tuple(out.shape))
        return out
    monkeypatch.setattr(torch, "cat", spy)
    monkeypatch.setenv("FASTINF_QUERY_MEMORY_MB", str(8 * scoring._state_bytes(
        scoring.query_state(ek, query[:3] if torch.is_tensor(query) else
                            tuple(t[:3] for t in query), 3)) / 3 / 2**20))
    for qbs in (None, 8):
        _close(ek.pairwise_scores(query, train, batch_size=3, query_batch_size=qbs), ref)
    assert dense_cats == []
    # the spy does see a concatenation of dense query states
    layers.DenseLayer(torch.cat([torch.zeros((1,) + s) for s in sorted(shapes)[:1]] * 2))
    assert dense_cats


def test_layer_groups_equal_one_batch(setup, monkeypatch):
    """From data, with all queries of each layer within the budget but not all layers, every
    query is scored once per group of layers (the train pass capturing that group only): the
    same scores and per-module scores as one batch of all layers."""
    ms, stores, train, query = setup
    ek = ms["ekfac"]
    sizes = {p: scoring._record_bytes(q.rec) for p, q in
             scoring.query_state(ek, query, 4)[0].items()}
    assert len(sizes) > 2
    monkeypatch.setenv("FASTINF_QUERY_MEMORY_MB", str(1.01 * max(sizes.values()) / 2**20))
    ref = {k: ek.pairwise_scores(query, train, batch_size=4, query_batch_size=11, **kw)
           for k, kw in (("all", {}), ("module", {"per_module": True}))}
    seen, train_layers = [], []
    real_qb, real_pass = scoring.query_batches, scoring._pass

    def spy_qb(*a, **k):
        for q0, st in real_qb(*a, **k):
            seen.append((q0, scoring._n_query(st), tuple(st[0])))
            yield q0, st

    def spy_pass(method, data, batch_size, name, measurement_fn=None, names=None, *a, **k):
        if name == "train":
            train_layers.append(None if names is None else tuple(names))
        return real_pass(method, data, batch_size, name, measurement_fn, names, *a, **k)
    monkeypatch.setattr(scoring, "query_batches", spy_qb)
    monkeypatch.setattr(scoring, "_pass", spy_pass)
    _close(ek.pairwise_scores(query, train, batch_size=4), ref["all"])
    groups = [g for _, _, g in seen]
    assert len(groups) > 1 and all(q0 == 0 and n == 11 for q0, n, _ in seen)
    assert sorted(p for g in groups for p in g) == sorted(sizes)      # each layer once
    assert train_layers == groups
    assert all(len(g) == 1 or sum(sizes[p] for p in g) <= 1.01 * max(sizes.values())
               for g in groups)
    got = ek.pairwise_scores(query, train, batch_size=4, per_module=True)
    assert list(got) == list(ref["module"])
    for k in got:
        _close(got[k], ref["module"][k])
    # more queries than train examples, a store, top_influences or per_token=True (its check
    # that all layers see the same tokens needs them together): query batches of all layers
    seen.clear()
    ek.pairwise_scores(query, tuple(t[:10] for t in train), batch_size=4)
    ek.pairwise_scores(query, stores["ekfac"], batch_size=4)
    ek.top_influences(query, train, k=2, batch_size=4)
    with pytest.raises(ValueError, match="same tokens"):
        ek.pairwise_scores(query, train, batch_size=4, per_token=True)
    assert len(seen) > 3 and all(g == tuple(sizes) for _, _, g in seen)


def _trimmed_loader(data, batch_size):
    """A DataLoader whose batches are cut to their longest example: T differs per batch."""
    from torch.utils.data import DataLoader, TensorDataset

    def collate(items):
        tok, mask, y = (torch.stack(x) for x in zip(*items))
        L = int(mask.sum(1).max())
        return tok[:, :L], mask[:, :L], y
    return DataLoader(TensorDataset(*data), batch_size=batch_size, collate_fn=collate)


@pytest.mark.parametrize("kind", ["ekfac_rank", "tracin"])
@pytest.mark.parametrize("how", ["sum", "per_module", "per_token"])
def test_train_tiles_equal_per_batch_scores(setup, monkeypatch, kind, how):
    """Against factor queries (rank-r, TracIn's tokens) consecutive train batches are scored as
    one tile (their tokens padded to the longest): the same scores as batch by batch, also with
    a different T per batch, per module and per token."""
    ms, _, train, query = setup
    m = ms["ekfac" if kind == "ekfac_rank" else "tracin"]
    if how == "per_token":      # the layers of the token sequence (the head sees a pooled vector)
        seq = ["qkv", "proj", "ff"]
        m = fastinf.EKFAC(m.model, tf_loss, modules=seq, token_mask_fn=_mask, progress=False).fit(
            train, batch_size=8) if kind == "ekfac_rank" else fastinf.TracIn(
            m.model, tf_loss, modules=seq, token_mask_fn=_mask, progress=False,
            checkpoints=[(m.model.state_dict(), 0.5)])
    kw = {"query_rank": 2} if kind == "ekfac_rank" else {}
    if how != "sum":
        kw[how] = True
    loader = _trimmed_loader(train, 4)
    assert len({b[0].shape[1] for b in loader}) > 1
    calls = []
    real = scoring._sum_scores

    def spy(method, records, state, **k):
        calls.append(len(next(iter(records.values()))))
        return real(method, records, state, **k)
    monkeypatch.setattr(scoring, "_sum_scores", spy)
    monkeypatch.setenv("FASTINF_TRAIN_TILE", "1")
    one = m.pairwise_scores(query, loader, batch_size=4, **kw)
    assert set(calls) <= {4} and len(calls) == 5 * len(m.terms())
    calls.clear()
    monkeypatch.setenv("FASTINF_TRAIN_TILE", "12")
    tiled = m.pairwise_scores(query, loader, batch_size=4, **kw)
    assert calls == [12, 8] * len(m.terms())
    if how == "per_module":
        assert list(tiled) == list(one)
        for k in one:
            _close(tiled[k], one[k])
    else:
        _close(tiled, one)


def test_arena_reuses_memory_only_when_released():
    """The query buffers of consecutive query batches share one block of memory, never while a
    previous batch's tensors are still referenced (a held state is not overwritten)."""
    ar = layers.Arena()
    a = ar.take((3, 4), torch.float32, "cpu")
    b = ar.take((5,), torch.float64, "cpu")
    a.fill_(1.0)
    ar.reset()                                   # a and b alive: a fresh block
    c = ar.take((3, 4), torch.float32, "cpu")
    c.fill_(2.0)
    assert float(a.sum()) == 12.0 and ar.need >= 3 * 4 * 4 + 5 * 8
    del a, b, c
    ar.reset()                                   # released: one block of the most a batch took
    d = ar.take((3, 4), torch.float32, "cpu")
    e = ar.take((5,), torch.float64, "cpu")
    assert ar.mem is not None
    assert d.untyped_storage().data_ptr() == e.untyped_storage().data_ptr() == \
        ar.mem.untyped_storage().data_ptr()
    assert e.data_ptr() % layers.Arena.ALIGN == 0 and e.shape == (5,) and e.dtype == torch.float64
    big = ar.take((1000,), torch.float32, "cpu")   # beyond the block: its own allocation
    assert big.untyped_storage().data_ptr() != ar.mem.untyped_storage().data_ptr()
    del d, e, big
    ar.reset()
    assert ar.mem is None and ar.need >= 4000    # grown at the next take


def test_train_tiles_stay_within_the_byte_bound(monkeypatch):
    """A tile joins batches while their records stay within train_tile()'s bytes (a batch above
    the bound is a tile alone), not until they first pass it: 3 batches of 40 bytes under a
    100-byte bound are tiles of 2 and 1."""
    class M:
        def train_layers(self, layers):
            return layers

    def batch(off):
        return off, {"l": layers.LayerBatch(torch.ones(2, 1, 2), torch.ones(2, 1, 3), None)}
    per = scoring._record_bytes(batch(0)[1]["l"])                  # 2·(2 + 3)·4 = 40 bytes
    monkeypatch.setattr(scoring, "train_tile", lambda: (100, int(2.5 * per)))
    tiles = [(o, len(t["l"])) for o, t in scoring._train_tiles(M(), [batch(2 * i) for i in range(3)])]
    assert tiles == [(0, 4), (4, 2)]
    monkeypatch.setattr(scoring, "train_tile", lambda: (100, per // 2))
    tiles = [(o, len(t["l"])) for o, t in scoring._train_tiles(M(), [batch(2 * i) for i in range(3)])]
    assert tiles == [(0, 2), (2, 2), (4, 2)]
