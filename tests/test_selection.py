"""fastinf.selection: for_target / harmful / suspicious return exactly what the scores say
(brute force over pairwise_scores / self_scores), on data and on stores, with an Ensemble, and
bad k / fraction / options raise naming the argument; the docs' example runs."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import fastinf
from fastinf import selection

N = 48


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def data(n, seed, dim=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))
    train, target, valid = data(N, 1), data(13, 2), data(11, 3)
    ek = fastinf.EKFAC(model, loss_fn, progress=False).fit(train, batch_size=16)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd2 = {k: v + 0.05 * torch.randn_like(v) for k, v in sd.items()}
    tr = fastinf.TracIn(model, loss_fn, checkpoints=[(sd2, 0.3), (sd, 0.1)], progress=False)
    return dict(ek=ek, tr=tr, train=train, target=target, valid=valid)


def brute_target(method, train, units, normalize, aggregate, subtasks):
    sn = method.self_scores(train).double()
    per_unit = []
    for u in units:
        S = method.pairwise_scores(u, train).double()
        if normalize:
            S = S / (method.self_scores(u).double()[:, None] * sn[None]).sqrt()
        per_unit.append(S.mean(0, keepdim=True) if subtasks else S)
    S = torch.cat(per_unit)
    return S.amax(0) if aggregate == "max" else S.mean(0)


def check_pick(got, scores, k, descending):
    idx, vals = got
    order = torch.sort(scores, descending=descending, stable=True).indices[:k]
    assert idx.tolist() == order.tolist()
    # float32 scores, computed in other query batches
    torch.testing.assert_close(vals, scores[order], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["ek", "tr"])
@pytest.mark.parametrize("normalize,aggregate", [("cosine", "max"), ("cosine", "mean"),
                                                  (None, "max"), (None, "mean")])
def test_for_target_matches_brute_force(setup, name, normalize, aggregate):
    m, train, target = setup[name], setup["train"], setup["target"]
    want = brute_target(m, train, [target], normalize, aggregate, subtasks=False)
    got = selection.for_target(m, train, target, k=7, normalize=normalize, aggregate=aggregate,
                               query_batch=4)  # 13 target rows in uneven batches of 4
    check_pick(got, want, 7, descending=True)
    if normalize:  # a cosine in the method's inner product (Cauchy-Schwarz)
        assert want.abs().max() <= 1 + 1e-5


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_for_target_subtasks(setup, aggregate):
    ek, train, (Xt, yt) = setup["ek"], setup["train"], setup["target"]
    subtasks = [(Xt[:5], yt[:5]), TensorDataset(Xt[5:], yt[5:])]  # any data form per subtask
    want = brute_target(ek, train, subtasks, "cosine", aggregate, subtasks=True)
    got = selection.for_target(ek, train, subtasks, fraction=0.25, aggregate=aggregate,
                               query_batch=3)
    check_pick(got, want, 12, descending=True)


def test_harmful_and_suspicious_match_brute_force(setup):
    for m in (setup["ek"], setup["tr"]):
        train, valid = setup["train"], setup["valid"]
        total = m.pairwise_scores(valid, train).double().sum(0)
        check_pick(selection.harmful(m, train, valid, k=5, query_batch=2), total, 5,
                   descending=False)
        assert (selection.harmful(m, train, valid, fraction=1.0)[0].sort().values
                == torch.arange(N)).all()
        check_pick(selection.suspicious(m, train, fraction=0.1), m.self_scores(train).double(),
                   5, descending=True)


def test_store_equals_data_and_ensemble(setup, tmp_path):
    ek, tr, train, target, valid = (setup[k] for k in ("ek", "tr", "train", "target", "valid"))
    stores = [fastinf.GradientStore.build(tmp_path / n, m, train, batch_size=16, shard_size=16,
                                          progress=False) for n, m in (("ek", ek), ("tr", tr))]
    for m, store in zip((ek, tr), stores):
        for fn, args in ((selection.for_target, (target,)), (selection.harmful, (valid,)),
                         (selection.suspicious, ())):
            a = fn(m, train, *args, k=9)
            b = fn(m, store, *args, k=9)
            assert a[0].tolist() == b[0].tolist(), fn.__name__
            torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-6)
    ens = fastinf.Ensemble.balanced([ek, tr], train)
    want = brute_target(ens, train, [target], "cosine", "max", subtasks=False)
    check_pick(selection.for_target(ens, train, target, k=6), want, 6, descending=True)
    a = selection.for_target(ens, stores, target, k=6)      # one store per member
    assert a[0].tolist() == want.argsort(descending=True)[:6].tolist()
    check_pick(selection.harmful(ens, stores, valid, k=4),
               ens.pairwise_scores(valid, train).double().sum(0), 4, descending=False)


@pytest.mark.parametrize("kw,needle", [
    ({}, "exactly one of k= "), ({"k": 3, "fraction": 0.5}, "exactly one of k= "),
    ({"k": 0}, "k must be a positive int, got 0"), ({"k": 2.0}, "k must be a positive int"),
    ({"k": N + 1}, f"k={N + 1} is more than the {N} training examples"),
    ({"fraction": 0.0}, "fraction must be a number in (0, 1], got 0.0"),
    ({"fraction": 1.5}, "fraction must be a number in (0, 1]"),
    ({"k": 2, "normalize": "l2"}, "normalize must be 'cosine' or None, got 'l2'"),
    ({"k": 2, "aggregate": "sum"}, "aggregate must be 'max' or 'mean', got 'sum'"),
    ({"k": 2, "query_batch": 0}, "query_batch must be a positive int or None, got 0"),
])
def test_bad_arguments(setup, kw, needle):
    with pytest.raises(ValueError) as e:
        selection.for_target(setup["ek"], setup["train"], setup["target"], **kw)
    assert needle in str(e.value)


def test_bad_arguments_other_functions(setup):
    ek, train = setup["ek"], setup["train"]
    with pytest.raises(ValueError, match=r"suspicious: give exactly one of k="):
        selection.suspicious(ek, train)
    with pytest.raises(ValueError, match=r"harmful: fraction must be a number in \(0, 1\]"):
        selection.harmful(ek, train, setup["valid"], fraction=2)
    with pytest.raises(ValueError, match="harmful: valid is empty"):
        selection.harmful(ek, train, (torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)), k=1)


def test_cosine_rejects_negative_self_influence():
    class Signed:  # an inner product that is not positive: cosine is meaningless
        def pairwise_scores(self, q, t, batch_size=64):
            return torch.ones(len(q), len(t))

        def self_scores(self, t, batch_size=64):
            return -torch.arange(len(t), dtype=torch.float32)

    with pytest.raises(ValueError, match="training example 3 has -3"):
        selection.for_target(Signed(), torch.zeros(4, 1), torch.zeros(2, 1), k=1)
    idx, s = selection.for_target(Signed(), torch.zeros(4, 1), torch.zeros(2, 1), k=1,
                                  normalize=None)
    assert idx.tolist() == [0] and s.tolist() == [1.0]


def test_docs_example_runs():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "selection.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert blocks
    ns = {"__name__": "__doc_example__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/selection.md[{i}]", "exec"), ns)
    assert ns["idx"].shape == (100,) and ns["bad"].shape == (60,)
