"""fastinf.Ensemble: the weighted combination of its members' scores (pairwise, self, top-k), on
data and on one store per member; balanced weights; bad arguments raise naming them."""
import pytest
from functools import partial

import torch
from torch import nn
from torch.utils.data import TensorDataset
from test_selection import data, loss_fn

import fastinf
from fastinf import Ensemble

N = 40
data = partial(data, dim=5, classes=3)


@pytest.fixture(scope="module")
def members():
    train = data(N, 1)
    out = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        out.append(fastinf.EKFAC(model, loss_fn, progress=False).fit(train, batch_size=16))
    out.append(fastinf.TracIn(model, loss_fn, checkpoints=[(model.state_dict(), 0.2)],
                              progress=False))
    return out, train, data(7, 2)


def combo(methods, weights, fn):
    return sum(w * fn(m).double() for w, m in zip(weights, methods))


def test_weighted_combination(members):
    methods, train, query = members
    w = [0.5, 2.0, 30.0]
    ens = Ensemble(methods, w)
    torch.testing.assert_close(ens.pairwise_scores(query, train, batch_size=16).double(),
                               combo(methods, w, lambda m: m.pairwise_scores(query, train)),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ens.self_scores(train).double(),
                               combo(methods, w, lambda m: m.self_scores(train)),
                               rtol=1e-6, atol=1e-6)
    mean = Ensemble(methods[:2])  # default: the mean
    torch.testing.assert_close(mean.pairwise_scores(query, train).double(),
                               combo(methods[:2], [0.5, 0.5],
                                     lambda m: m.pairwise_scores(query, train)),
                               rtol=1e-6, atol=1e-6)
    nested = Ensemble([mean, methods[2]], [1.0, 3.0])
    torch.testing.assert_close(nested.self_scores(train).double(),
                               combo(methods, [0.5, 0.5, 3.0], lambda m: m.self_scores(train)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("largest", [True, False])
def test_top_influences(members, largest):
    methods, train, query = members
    ens = Ensemble(methods, [1.0, 1.0, 10.0])
    S = ens.pairwise_scores(query, train)
    vals, idx = ens.top_influences(query, train, k=5, largest=largest, query_batch=3)
    want_v, want_i = torch.topk(S, 5, dim=1, largest=largest)
    assert idx.tolist() == want_i.tolist()
    torch.testing.assert_close(vals, want_v)
    # restricted candidates: one set for all queries, then one per query (fewer than k: nan / -1)
    cand = torch.tensor([3, 9, 17, 30])
    vals, idx = ens.top_influences(TensorDataset(*query), train, k=6, largest=largest,
                                   train_indices=cand, query_batch=2)
    want_v, pos = torch.topk(S[:, cand], 4, dim=1, largest=largest)
    assert idx[:, :4].tolist() == cand[pos].tolist() and (idx[:, 4:] == -1).all()
    torch.testing.assert_close(vals[:, :4], want_v)
    assert torch.isnan(vals[:, 4:]).all()
    per = [torch.tensor([q, q + 1]) for q in range(len(query[0]))]
    vals, idx = ens.top_influences(query, train, k=1, largest=largest, train_indices=per)
    for q in range(len(per)):
        best = per[q][S[q, per[q]].argmax() if largest else S[q, per[q]].argmin()]
        assert int(idx[q, 0]) == int(best)


def test_stores_one_per_member(members, tmp_path):
    methods, train, query = members
    stores = [fastinf.GradientStore.build(tmp_path / str(i), m, train, batch_size=16,
                                          shard_size=16, progress=False)
              for i, m in enumerate(methods)]
    ens = Ensemble(methods, [1.0, 1.0, 5.0])
    torch.testing.assert_close(ens.pairwise_scores(query, stores),
                               ens.pairwise_scores(query, train), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ens.self_scores(stores), ens.self_scores(train),
                               rtol=1e-4, atol=1e-5)
    top_store, top_data = ens.top_influences(query, stores, k=3), ens.top_influences(query, train, k=3)
    assert (top_store[1] == top_data[1]).all()
    with pytest.raises(ValueError, match="one GradientStore per member expected \\(3\\), got 2"):
        ens.pairwise_scores(query, stores[:2])
    with pytest.raises(ValueError, match="a GradientStore belongs to the one method"):
        ens.self_scores(stores[0])
    with pytest.raises(fastinf.StoreError):          # stores in the wrong order
        ens.self_scores([stores[1], stores[0], stores[2]])


def test_balanced_weights(members):
    methods, train, _ = members
    ens = Ensemble.balanced(methods, train)
    rms = [float(m.self_scores(train).double().pow(2).mean().sqrt()) for m in methods]
    assert ens.weights == pytest.approx([1 / (3 * r) for r in rms], rel=1e-6)
    # every member now has self-influence RMS 1/M
    for w, m in zip(ens.weights, methods):
        rms = float((w * m.self_scores(train).double()).pow(2).mean().sqrt())
        assert rms == pytest.approx(1 / 3)


def test_bad_arguments(members):
    methods, train, query = members
    with pytest.raises(ValueError, match="methods must be a non-empty list"):
        Ensemble([])
    with pytest.raises(TypeError, match=r"methods\[1\] \(str\) has no pairwise_scores"):
        Ensemble([methods[0], "ekfac"])
    with pytest.raises(ValueError, match=r"weights: one per method expected \(3\), got 2"):
        Ensemble(methods, [1.0, 2.0])
    with pytest.raises(ValueError, match="weights must be finite and positive"):
        Ensemble(methods, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        Ensemble(methods).top_influences(query, train, k=0)
    with pytest.raises(ValueError, match=r"train_indices: values must lie in \[0, 40\)"):
        Ensemble(methods).top_influences(query, train, k=1, train_indices=torch.tensor([40]))
