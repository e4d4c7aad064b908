"""EK-FAC's exact queries kept as rotated tokens (fastinf.layers.EigenTokens, "compact queries"):
``T·(din + dout)`` numbers per query instead of ``din·dout``, ``X_q`` rebuilt per train tile.
Their scores equal those of the dense eigenbasis form (Eigen) in float64, record by record and
through the engine, which picks them where the dense form would need more passes."""
import pytest
import torch

import fastinf
import fastinf.scoring as scoring
from fastinf import layers as L
from fastinf.ops import _common as c
from _models import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)
from test_replay import BlockLM, _groups_budget, _mask, data, f64, lm_loss  # noqa: F401


def _close(a, b, tol=1e-9):
    assert a.shape == b.shape, (a.shape, b.shape)
    err, ref = float((a - b).abs().max()), float(b.abs().max())
    assert ref > 0 and err <= tol * ref, (err, ref)


def _fit(seed=0, n=20, nq=9, **model):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, query = data(g, n), data(g, nq)
    ek = fastinf.EKFAC(BlockLM(**model), lm_loss, token_mask_fn=_mask, progress=False)
    return ek.fit(train, batch_size=8), train, query


def _trimmed(data_, batch_size):
    """Batches cut to their longest example: the token count differs per batch."""
    from torch.utils.data import DataLoader, TensorDataset

    def collate(items):
        tok, mask = (torch.stack(x) for x in zip(*items))
        n = int(mask.sum(1).max())
        return tok[:, :n], mask[:, :n]
    return DataLoader(TensorDataset(*data_), batch_size=batch_size, collate_fn=collate)


def _train_records(ek, train, batch_size):
    return [ek.train_layers(lay) for _, lay in scoring._pass(ek, train, batch_size, "train")]


@pytest.mark.parametrize("queries", ["fixed", "trimmed"])
def test_token_queries_score_like_dense_eigen(f64, monkeypatch, queries):
    """Every layer's token queries (written into the query state's buffers, or joined where the
    token count changes between batches) stand for the same X_q as the dense eigenbasis form,
    and score the same against train tokens (padding masked), against dense train gradients,
    per token, and in one-row chunks of a tiny workspace."""
    ek, train, query = _fit()
    tok, mask = query
    mask[4:8, 4:] = False            # the second batch of 4: at most 4 tokens
    query = (torch.where(mask, tok, 0), mask)
    q = query if queries == "fixed" else _trimmed(query, 4)
    if queries == "trimmed":
        assert len({int(m.sum(1).max()) for _, m in q}) > 1     # T differs between batches
    dense = scoring.query_state(ek, q, 4)[0]
    tokens = scoring.query_state(ek, q, 4, compact=True)[0]
    assert list(tokens) == list(dense) == list(ek.modules)
    for p, qt in tokens.items():
        r = qt.rec
        assert isinstance(r, L.EigenTokens) and isinstance(dense[p].rec, L.Eigen), p
        assert len(r) == 9 and r.A.shape[1] == (7 if queries == "fixed" else
                                                int(query[1].sum(1).max()))
        _close(r.to_eigen().X, dense[p].rec.X)
        # the state holds T·(din + dout) numbers per query, fewer than dout·din here
        assert scoring._record_bytes(r) < scoring._record_bytes(dense[p].rec)
    recs = _train_records(ek, _trimmed(train, 6), 6)
    assert len({r["blocks.0.q"].A.shape[1] for r in recs}) > 1       # varying T, padding
    for small in (False, True):
        if small:       # one row of X (and one query) at a time
            monkeypatch.setenv("FASTINF_WORKSPACE_MB", "1e-6")
        for rec in recs:
            for p, qt in tokens.items():
                t = rec[p]
                _close(L.score(t, qt, torch.float64), L.score(t, dense[p], torch.float64))
                _close(L.score(t, qt, torch.float64, per_token=True),
                       L.score(t, dense[p], torch.float64, per_token=True))
                D = torch.einsum("bto,bti->boi", c.mask_rows(t.G, t.mask), t.A)
                _close(L.score(L.DenseLayer(D), qt, torch.float64),
                       L.score(L.DenseLayer(D), dense[p], torch.float64))


def test_token_queries_only_where_fewer_numbers(f64):
    """``compact=True`` keeps tokens only for layers with T·(din + dout) < din·dout; a wide
    token count keeps the dense form; rank-r queries are never token queries."""
    ek, train, query = _fit()
    long_q = data(torch.Generator().manual_seed(5), 6, L=40)
    st = scoring.query_state(ek, long_q, 3, compact=True)[0]
    for p, q in st.items():
        r, (din, dout) = q.rec, (q.rec.QA.shape[0], q.rec.QS.shape[0])
        assert isinstance(r, L.EigenTokens if 40 * (din + dout) < din * dout else L.Eigen), p
    assert not any(isinstance(q.rec, L.EigenTokens) for q in
                   scoring.query_state(ek, query, 3, compact=True, query_rank=2)[0].values())


def test_record_stack_joins_token_records():
    """Token records written into the stack's buffers, then one with another token count: the
    result is every batch zero-padded to the longest and joined in order."""
    g = torch.Generator().manual_seed(0)
    base = dict(lam=torch.rand(3, 2, generator=g), damping=0.1, QA=torch.eye(2), QS=torch.eye(3))
    recs = [L.EigenTokens(torch.randn(b, t, 2, generator=g), torch.randn(b, t, 3, generator=g),
                          **base) for b, t in ((2, 4), (3, 4), (1, 6), (2, 3))]
    for arena in (None, L.Arena()):
        st = L.RecordStack(8, arena)
        dst = st.reserve_tokens(2, 4, 2, 3, torch.float32, "cpu")
        dst[0].copy_(recs[0].A)
        dst[1].copy_(recs[0].G)
        st.add(L.EigenTokens(dst[0], dst[1], **base))       # written there: nothing copied
        for r in recs[1:]:
            st.add(r)
        out = st.result()
        assert isinstance(out, L.EigenTokens) and out.A.shape == (8, 6, 2)
        pad = [torch.nn.functional.pad(r.A, (0, 0, 0, 6 - r.A.shape[1])) for r in recs]
        assert torch.equal(out.A, torch.cat(pad))
        pad = [torch.nn.functional.pad(r.G, (0, 0, 0, 6 - r.G.shape[1])) for r in recs]
        assert torch.equal(out.G, torch.cat(pad))
        assert out.lam is base["lam"] and out.damping == 0.1


def test_rotate_rows_in_chunks_and_into_out(f64):
    """The CPU's masked rotation gathers and multiplies kept rows in chunks (1,200 rows of
    1,200-wide products: two chunks) and writes into ``out``; the same as mask-then-multiply,
    NaN rows of excluded tokens included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 400, 600, generator=g)
    Q = torch.randn(600, 600, generator=g)
    mask = torch.rand(3, 400, generator=g) > 0.3
    x[~mask] = float("nan")
    ref = torch.where(mask[..., None], x, 0.0) @ Q
    _close(c.rotate_rows(x, Q, mask), ref)
    out = torch.full((3, 400, 600), 7.0)
    assert c.rotate_rows(x, Q, mask, out) is out
    _close(out, ref)
    x = torch.randn(2, 5, 6, generator=g)
    out = torch.empty(2, 5, 4)
    _close(c.rotate_rows(x, Q[:6, :4], None, out), x @ Q[:6, :4])


def _spy(monkeypatch):
    """Per query batch: the kinds of records in its state."""
    seen = []
    real = scoring.query_batches

    def spy(*a, **k):
        for q0, st in real(*a, **k):
            seen.append({type(q.rec).__name__ for s in st for q in s.values()})
            yield q0, st
    monkeypatch.setattr(scoring, "query_batches", spy)
    return seen


def test_engine_picks_token_queries_with_the_same_scores(f64, monkeypatch):
    """Under a budget that holds ~40% of the dense query state the engine keeps the queries as
    tokens (fewer groups of layers, fewer replays), and pairwise, per-module, per-token scores
    and top influences equal those of one dense batch (scores come back in float32);
    ``compact_queries = False`` keeps the
    dense form."""
    ek, train, query = _fit()
    ref = dict(all=ek.pairwise_scores(query, train, batch_size=4),
               module=ek.pairwise_scores(query, train, batch_size=4, per_module=True),
               token=ek.pairwise_scores(query, train, batch_size=4, per_token=True))
    ref_top = ek.top_influences(query, train, k=3, batch_size=4)
    _groups_budget(ek, query, len(train[0]), monkeypatch)
    seen = _spy(monkeypatch)
    _close(ek.pairwise_scores(query, train, batch_size=4), ref["all"], 1e-6)
    assert seen and all(s == {"EigenTokens"} for s in seen), seen
    n_tokens = len(seen)
    got = ek.pairwise_scores(query, train, batch_size=4, per_module=True)
    assert list(got) == list(ref["module"])
    for k in got:
        _close(got[k], ref["module"][k], 1e-6)
    _close(ek.pairwise_scores(query, train, batch_size=4, per_token=True), ref["token"], 1e-6)
    idx, val = ek.top_influences(query, train, k=3, batch_size=4)
    assert torch.equal(idx, ref_top[0])
    _close(val, ref_top[1], 1e-6)
    seen.clear()
    ek.compact_queries = False
    _close(ek.pairwise_scores(query, train, batch_size=4), ref["all"], 1e-6)
    assert seen and all(s == {"Eigen"} for s in seen), seen
    assert len(seen) > n_tokens        # the dense form needs more groups of layers


def test_token_queries_against_a_store(f64, monkeypatch, tmp_path):
    """From a store (train tokens, or dense train gradients: ``layout="dense"``) the plan
    counts query passes: under a budget of 8.5 token queries they take 2 query batches where
    the dense form takes 3, and the scores equal those of one dense batch."""
    ek, train, query = _fit()
    ref = ek.pairwise_scores(query, train, batch_size=4)
    per = {k: sum(scoring._record_bytes(q.rec) for q in scoring.query_state(
        ek, query, 4, compact=k)[0].values()) / 9 for k in (False, True)}
    assert per[True] < 0.8 * per[False]
    # 8.5 token queries: batches of 8 (whole capture batches), 2 passes; dense: 4, 3 passes
    monkeypatch.setenv("FASTINF_QUERY_MEMORY_MB", str(8.5 * per[True] / 2**20))
    seen = _spy(monkeypatch)
    for kw in ({"layout": "factors"}, {"layout": "dense"}):
        store = fastinf.GradientStore.build(tmp_path / kw["layout"], ek, train, batch_size=6,
                                            shard_size=7, progress=False, **kw)
        seen.clear()
        _close(ek.pairwise_scores(query, store, batch_size=4), ref, 1e-6)
        assert seen == [{"EigenTokens"}] * 2, seen
        ek.compact_queries = False
        seen.clear()
        _close(ek.pairwise_scores(query, store, batch_size=4), ref, 1e-6)
        assert seen == [{"Eigen"}] * 3, seen
        ek.compact_queries = True
