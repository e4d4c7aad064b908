"""EK-FAC's cheaper forms (issue 11 item 3): every rotation order and scoring basis, forced,
against the float64 brute force of test_ekfac (torch.func per-example gradients) and against the
dense-rotation path."""
import pytest
import torch
from test_ekfac import brute_ekfac, brute_scores, make_case, rel

import fastinf
from fastinf.layers import DenseLayer, Eigen, LayerBatch, Query, score

BASES = ("eigen", "original")


@pytest.fixture(scope="module", params=["mlp", "cnn", "lm"])
def case(request):
    model, loss_fn, mask_fn, train = make_case(request.param)
    ek = fastinf.EKFAC(model, loss_fn, token_mask_fn=mask_fn, progress=False).fit(train, batch_size=5)
    names = list(ek.modules)
    fac, D = brute_ekfac(model, loss_fn, mask_fn, train, names)
    return ek, train, names, fac, D


def _force_basis(monkeypatch, basis):
    """eigen: rotate every train batch; original: rotate the queries back at the first batch."""
    monkeypatch.setattr(Query, "_eigen_rotates_train",
                        lambda self, train: basis == "eigen" and self._dense is None)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("rotation", ["tokens", "dense", None])
def test_forced_forms_match_brute_force(case, monkeypatch, rotation, basis):
    ek, train, names, fac, D = case
    _force_basis(monkeypatch, basis)
    monkeypatch.setattr(ek, "force_rotation", rotation)
    q = tuple(t[:4] for t in train)
    ref = brute_scores(fac, {n: D[n][:4] for n in names}, D, names)
    got = ek.pairwise_scores(q, train, batch_size=6)
    assert rel(got, ref) < 1e-6
    N = train[0].shape[0]
    self_ref = torch.stack([brute_scores(fac, {n: D[n][i:i + 1] for n in names},
                                         {n: D[n][i:i + 1] for n in names}, names)[0, 0]
                            for i in range(N)])
    assert rel(ek.self_scores(train, batch_size=7), self_ref) < 1e-6


@pytest.mark.parametrize("r", [1, 2, 4])    # 4: at least min(dout, din) for some layers
@pytest.mark.parametrize("rotation", ["tokens", "dense"])
def test_rank_r_is_the_truncated_svd_of_the_preconditioned_gradient(case, monkeypatch, rotation, r):
    ek, train, names, fac, D = case
    monkeypatch.setattr(ek, "force_rotation", rotation)
    q = tuple(t[:3] for t in train)
    Mr = {}
    for n in names:
        f = fac[n]
        M = f["QS"] @ (f["QS"].T @ D[n][:3] @ f["QA"] / (f["lam"] + f["damping"])) @ f["QA"].T
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        k = min(r, S.shape[1])
        Mr[n] = (U[:, :, :k] * S[:, None, :k]) @ Vh[:, :k]
    ref = sum(torch.einsum("qoi,noi->qn", Mr[n], D[n]) for n in names)
    assert rel(ek.pairwise_scores(q, train, batch_size=6, query_rank=r), ref) < 1e-6


@pytest.mark.parametrize("rotation", ["tokens", "dense"])
def test_eigen_queries_and_self_match_the_dense_rotation_path(case, monkeypatch, rotation):
    """The query records and self-scores of each order equal the dense path (precondition)."""
    ek, train, names, _, _ = case
    monkeypatch.setattr(ek, "force_rotation", rotation)
    from fastinf._pass import factor_pass
    (_, layers), = factor_pass(ek.model, ek.loss_fn, train, ek.modules, len(train[0]),
                               token_mask_fn=ek.token_mask_fn, desc="", progress=False,
                               what="loss_fn", name="train")
    recs = ek.query_layers(layers)
    for n, lb in layers.items():
        assert isinstance(recs[n], Eigen)
        want = ek.precondition(n, lb.dense())
        assert rel(recs[n].dense(), want) < 1e-10
        # self-influence from factors and from the dense gradients agree
        assert rel(ek.self_layer(n, lb), ek.self_layer(n, DenseLayer(lb.dense()))) < 1e-10


def test_eigen_score_rule_both_bases_and_every_train_record():
    """layers.score of an Eigen query: rotated train tokens, rotated-back queries, dense train."""
    g = torch.Generator().manual_seed(0)
    B, T, Q, din, dout = 5, 3, 4, 6, 7
    dt = torch.float64
    QA = torch.linalg.qr(torch.randn(din, din, generator=g, dtype=dt))[0]
    QS = torch.linalg.qr(torch.randn(dout, dout, generator=g, dtype=dt))[0]
    X = torch.randn(Q, dout, din, generator=g, dtype=dt)
    mask = torch.rand(B, T, generator=g) < 0.7
    train = LayerBatch(torch.randn(B, T, din, generator=g, dtype=dt),
                       torch.randn(B, T, dout, generator=g, dtype=dt), mask)
    M = QS @ X @ QA.T
    ref = torch.einsum("qoi,noi->nq", M, train.dense())
    q = Query(Eigen(X, QA, QS))
    assert rel(score(train, q, dt), ref) < 1e-12                  # eigenbasis, tokens rotated
    assert q._dense is None and q.rotated_flops > 0
    q.rotated_flops = float("inf")                                # rotating back is now cheaper
    assert rel(score(train, q, dt), ref) < 1e-12
    assert isinstance(q.rec, DenseLayer)                          # X dropped once rotated back
    assert rel(score(DenseLayer(train.dense()), Query(Eigen(X, QA, QS)), dt), ref) < 1e-12


def test_ski_rental_rule():
    """Train batches rotate their tokens until that has cost as much as rotating back once."""
    din = dout = 8
    q = Query(Eigen(torch.zeros(2, dout, din), torch.eye(din), torch.eye(dout)))
    train = LayerBatch(torch.zeros(3, 4, din), torch.zeros(3, 4, dout))
    per_batch = 2.0 * 3 * 4 * (din * din + dout * dout)
    back = 2.0 * 2 * dout * din * (din + dout)
    uses = [q._eigen_rotates_train(train) for _ in range(6)]
    k = int(back // per_batch)
    assert uses == [True] * k + [False] * (6 - k)


def _wide_case():
    """Layers wide enough (40..48 > r + 24 for r <= 8) that query_rank takes the randomized
    path; float64."""
    g = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(40, 48), torch.nn.Tanh(),
                                torch.nn.Linear(48, 40)).double()
    x = torch.randn(24, 6, 40, generator=g, dtype=torch.float64)
    y = torch.randn(24, 6, 40, generator=g, dtype=torch.float64)

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).sum((1, 2))
    ek = fastinf.EKFAC(model, loss_fn, progress=False).fit((x, y), batch_size=8)
    return ek, (x, y)


def test_query_svd_randomized_and_exact():
    """query_svd="exact" is the truncated SVD (float64 reference); the default "randomized" is
    within a near-best rank-r approximation of it, and gives each query the same factors in any
    query batch."""
    ek, train = _wide_case()
    q = tuple(t[:7] for t in train)
    assert min(min(m.in_features, m.out_features) for m in ek.modules.values()) > 4 + 24
    from fastinf._pass import factor_pass
    (_, layers), = factor_pass(ek.model, ek.loss_fn, q, ek.modules, 7, desc="", progress=False,
                               what="loss_fn", name="query")
    D = {n: lb.dense() for n, lb in layers.items()}
    (_, tl), = factor_pass(ek.model, ek.loss_fn, train, ek.modules, 24, desc="", progress=False,
                           what="loss_fn", name="train")
    Dn = {n: lb.dense() for n, lb in tl.items()}
    ref = 0
    for n in ek.modules:
        M = ek.precondition(n, D[n])
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        ref = ref + torch.einsum("qoi,noi->qn", (U[..., :4] * S[:, None, :4]) @ Vh[:, :4], Dn[n])
    exact = ek.pairwise_scores(q, train, batch_size=8, query_rank=4, query_svd="exact")
    assert rel(exact, ref) < 1e-6
    rnd = ek.pairwise_scores(q, train, batch_size=8, query_rank=4)
    assert 0 < rel(rnd, ref) < 1e-2
    one = ek.pairwise_scores(q, train, batch_size=8, query_rank=4, query_batch_size=1)
    assert rel(one, rnd) < 1e-6
    with pytest.raises(ValueError, match="query_svd must be 'randomized' or 'exact'"):
        ek.pairwise_scores(q, train, query_rank=4, query_svd="fast")
