"""TracIn: exact scores vs brute-force per-example gradients, projections, bad input, the doc example."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fastinf
from fastinf._native import available
from fastinf.capture import NonFiniteError, tracked_modules

from _models import TinyTransformer, ce_loss, tf_loss, token_data


# --------------------------------------------------------------------------- models and data
def _mlp():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(3, 4, 2, stride=1, padding=0, bias=False), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, 3))


def _data(kind, n):
    g = torch.Generator().manual_seed(n)
    if kind == "mlp":
        return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)
    if kind == "cnn":
        return torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return token_data(g, n)


CASES = {"mlp": (_mlp, ce_loss), "cnn": (_cnn, ce_loss), "transformer": (TinyTransformer, tf_loss)}


def _checkpoints(make):
    torch.manual_seed(1)
    cks = []
    for lr in (0.5, 0.1, 0.02):
        m = make()
        cks.append(({k: v.clone() for k, v in m.state_dict().items()}, lr))
    return cks


def _brute(model, loss_fn, cks, query, train):
    """Σ_c η_c ⟨∇ℓ_q, ∇ℓ_n⟩ over the tracked parameters, per-example grads via vmap(grad)."""
    names = [f"{n}.{p}" if n else p for n, m in tracked_modules(model).items()
             for p, _ in m.named_parameters(recurse=False)]
    out = 0
    for sd, lr in cks:
        params = {k: v.detach().clone() for k, v in sd.items()}
        train_keys = [k for k in params if k in names]

        def f(tp, *ex):
            full = dict(params, **tp)
            batch = tuple(e[None] for e in ex)
            return loss_fn(lambda *a: functional_call(model, full, a), batch)[0]

        def flat(data):
            tp = {k: params[k] for k in train_keys}
            gs = vmap(grad(f), in_dims=(None,) + (0,) * len(data))(tp, *data)
            return torch.cat([gs[k].flatten(1) for k in train_keys], 1).double()

        out = out + lr * flat(query) @ flat(train).T
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_exact_equals_brute_force(case):
    make, loss_fn = CASES[case]
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cks = _checkpoints(make)
    query, train = _data(case, 5), _data(case, 13)
    mask_fn = (lambda b: b[1]) if case == "transformer" else None
    tr = fastinf.TracIn(model, loss_fn, checkpoints=cks, progress=False, token_mask_fn=mask_fn)
    S = tr.pairwise_scores(query, train, batch_size=4)
    ref = _brute(model, loss_fn, cks, query, train)
    assert S.shape == (5, 13) and S.dtype == torch.float32
    torch.testing.assert_close(S.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    s = tr.self_scores(train, batch_size=5)
    self_ref = _brute(model, loss_fn, cks, train, train).diag()
    torch.testing.assert_close(s.double(), self_ref, rtol=1e-5, atol=1e-5 * self_ref.abs().max().item())
    # the user's weights are restored after the passes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_default_checkpoint_and_paths(tmp_path):
    model = _mlp()
    query, train = _data("mlp", 3), _data("mlp", 8)
    p = tmp_path / "ck.pt"
    torch.save(model.state_dict(), p)
    a = fastinf.TracIn(model, ce_loss, progress=False).pairwise_scores(query, train)
    b = fastinf.TracIn(model, ce_loss, checkpoints=[(str(p), 2.0)],
                       progress=False).pairwise_scores(query, train)
    torch.testing.assert_close(b, 2 * a)
    ref = _brute(model, ce_loss, [(model.state_dict(), 1.0)], query, train)
    torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-6)


def test_dense_query_path_matches():
    # long query sequences make D_q = G_qᵀ A_q cheaper: score_dense path
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 50, 3), torch.randn(4, 50, 2)

    def loss(m, b):
        return ((m(b[0]) - b[1]) ** 2).sum((1, 2))
    tr = fastinf.TracIn(model, loss, progress=False)
    S = tr.pairwise_scores((x, y), (x, y), batch_size=2)
    ref = _brute(model, loss, [(model.state_dict(), 1.0)], (x, y), (x, y))
    torch.testing.assert_close(S.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(tr.self_scores((x, y)), S.diag(), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- projections
PROJ_BACKENDS = ["torch"] + [b for b in ("cpu", "triton") if available(b)]


@pytest.mark.parametrize("proj", [fastinf.KroneckerProjection(8, 4, seed=3),
                                  fastinf.RandomProjection(64, seed=3),
                                  fastinf.RandomProjection(48, seed=1, kind="normal")])
def test_projection_deterministic_across_backends(proj):
    model = _mlp()
    query, train = _data("mlp", 3), _data("mlp", 6)
    outs = [fastinf.TracIn(model, ce_loss, projection=proj, progress=False, backend=b)
            .pairwise_scores(query, train, batch_size=4) for b in PROJ_BACKENDS]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-4, atol=1e-5 * outs[0].abs().max().item())
    tr = fastinf.TracIn(model, ce_loss, projection=proj, progress=False)
    torch.testing.assert_close(tr.self_scores(train, batch_size=4),
                               tr.pairwise_scores(train, train, batch_size=4).diag(),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make_proj", [lambda s: fastinf.KroneckerProjection(8, 8, seed=s),
                                       lambda s: fastinf.RandomProjection(128, seed=s)])
def test_projection_unbiased(make_proj):
    model = _mlp()
    query, train = _data("mlp", 4), _data("mlp", 6)
    exact = fastinf.TracIn(model, ce_loss, progress=False).pairwise_scores(query, train)
    est = torch.stack([fastinf.TracIn(model, ce_loss, projection=make_proj(s), progress=False)
                       .pairwise_scores(query, train) for s in range(40)]).mean(0)
    rel = (est - exact).norm() / exact.norm()
    assert rel < 0.25, rel
    # and a single projection correlates with the exact scores
    one = fastinf.TracIn(model, ce_loss, projection=make_proj(0), progress=False)
    p = one.pairwise_scores(query, train).flatten()
    assert torch.corrcoef(torch.stack([p, exact.flatten()]))[0, 1] > 0.5


# --------------------------------------------------------------------------- bad input
def test_bad_inputs(tmp_path):
    model = _mlp()
    x, y = _data("mlp", 6)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        fastinf.TracIn(model, ce_loss, checkpoints=[(str(tmp_path / "nope.pt"), 1.0)])
    bad = {k: v for k, v in model.state_dict().items() if k != "2.bias"}
    bad["extra.weight"] = torch.zeros(1)
    tr = fastinf.TracIn(model, ce_loss, checkpoints=[(bad, 1.0)], progress=False)
    with pytest.raises(ValueError, match=r"missing keys \['2.bias'\].*unexpected keys \['extra.weight'\]"):
        tr.pairwise_scores((x, y), (x, y))
    wrong = dict(model.state_dict())
    wrong["0.weight"] = torch.zeros(3, 3)
    p = tmp_path / "wrong.pt"
    torch.save(wrong, p)
    with pytest.raises(ValueError, match=r"wrong.pt.*0.weight: \(3, 3\)"):
        fastinf.TracIn(model, ce_loss, checkpoints=[(str(p), 1.0)],
                       progress=False).self_scores((x, y))
    with pytest.raises(ValueError, match="learning rate"):
        fastinf.TracIn(model, ce_loss, checkpoints=[(model.state_dict(), float("nan"))])
    with pytest.raises(ValueError, match="one loss per example"):
        fastinf.TracIn(model, lambda m, b: ce_loss(m, b).sum(), progress=False).self_scores((x, y))
    xn = x.clone()
    xn[2, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="example 2"):
        fastinf.TracIn(model, ce_loss, progress=False).pairwise_scores((x, y), (xn, y))
    with pytest.raises(RuntimeError):
        fastinf.TracIn(model, ce_loss, progress=False).self_scores((torch.randn(6, 5), y))
    with pytest.raises(ValueError, match="batch_size"):
        fastinf.TracIn(model, ce_loss, progress=False).self_scores((x, y), batch_size=0)
    with pytest.raises(TypeError, match="projection"):
        fastinf.TracIn(model, ce_loss, projection="jl")
    with pytest.raises(ValueError, match="k_in"):
        fastinf.KroneckerProjection(0, 4)
    with pytest.raises(ValueError, match="empty"):
        fastinf.TracIn(model, ce_loss, progress=False).self_scores((x[:0], y[:0]))


# --------------------------------------------------------------------------- the doc example
def test_doc_example():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "tracin.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    ns = {}
    exec(compile(code, "docs/tracin.md", "exec"), ns)
    assert ns["scores"].shape == (5, 64) and ns["self_inf"].shape == (64,)
